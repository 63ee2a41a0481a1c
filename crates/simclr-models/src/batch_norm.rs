//! Batch normalisation with the official semantics (the official tf2/resnet.py, `BatchNormRelu`).
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
//!   With [`BnMode::global`] the statistics are over every replica's batch: the per-channel
//!   sums of `x` and `x²` are all-reduced through the collective, as the official
//!   cross-replica BN does, and the gradient goes back through the same all-reduce.
//! * The passes over the activation run as fused kernels ([`simclr_kernels::bn_ops`]); a ReLU that
//!   follows a BN is fused into it ([`BatchNorm::forward_relu`]).
//! * Inference mode uses the moving statistics; they receive no gradient (they are detached).

use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};
use simclr_collective::Collective;

use simclr_kernels::bn_ops::{
    bn_apply_add, bn_apply_add_local, channel_moments, local_fold_available, moments_to_stats,
    stats_dtype,
};

/// Which statistics a BN layer normalises with.
///
/// `bool` converts into it: `true` is training mode on this replica's batch alone, `false`
/// inference mode.
#[derive(Clone, Copy, Default)]
pub struct BnMode<'a> {
    /// Batch statistics (and moving-average updates) instead of the moving statistics.
    pub train: bool,
    /// In training mode, the replicas whose batches the statistics are computed over (global
    /// BN); `None` is this replica alone.
    pub replicas: Option<&'a dyn Collective>,
}

impl<'a> BnMode<'a> {
    /// Training mode with statistics over every replica's batch.
    pub fn global(replicas: &'a dyn Collective) -> Self {
        Self {
            train: true,
            replicas: Some(replicas),
        }
    }

    /// The same mode, or inference mode where `frozen`.
    pub fn unless_frozen(self, frozen: bool) -> Self {
        Self {
            train: self.train && !frozen,
            ..self
        }
    }
}

impl From<bool> for BnMode<'_> {
    fn from(train: bool) -> Self {
        Self {
            train,
            replicas: None,
        }
    }
}

impl std::fmt::Debug for BnMode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BnMode")
            .field("train", &self.train)
            .field("world_size", &self.replicas.map_or(1, |c| c.world_size()))
            .finish()
    }
}

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

    /// Normalises `x`; in training mode with batch statistics (and updates the moving ones),
    /// otherwise with the moving statistics.
    pub fn forward<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        self.forward_act(x, mode.into(), None, false)
    }

    /// `relu(self.forward(x, mode))`, fused into one pass.
    pub fn forward_relu<'a>(&self, x: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Tensor> {
        self.forward_act(x, mode.into(), None, true)
    }

    /// `relu(self.forward(x, mode) + residual)`, fused into one pass (the end of a residual
    /// block).
    pub fn forward_add_relu<'a>(
        &self,
        x: &Tensor,
        residual: &Tensor,
        mode: impl Into<BnMode<'a>>,
    ) -> Result<Tensor> {
        self.forward_act(x, mode.into(), Some(residual), true)
    }

    fn forward_act(
        &self,
        x: &Tensor,
        mode: BnMode,
        residual: Option<&Tensor>,
        relu: bool,
    ) -> Result<Tensor> {
        if x.rank() < 2 || x.dim(1)? != self.channels {
            candle_core::bail!(
                "BatchNorm over {} channels got a tensor of shape {:?}",
                self.channels,
                x.shape()
            )
        }
        let sd = stats_dtype(x.dtype());
        // One process on the CPU: statistics without a graph, their gradient folded into the
        // apply op's backward (`bn_apply_add_local`).
        let fold = mode.train && mode.replicas.is_none() && local_fold_available(x, residual);
        let stats = if fold {
            let count = x.elem_count() / self.channels;
            let moments = channel_moments(&x.detach())?;
            let (stats, mean, var) = moments_to_stats(&moments, count, self.opts.eps, sd)?;
            self.update_moving(&mean, &var)?;
            stats
        } else if mode.train {
            let local = channel_moments(x)?;
            let (moments, world) = match mode.replicas {
                Some(c) => (c.all_reduce_sum(&local)?, c.world_size()),
                None => (local, 1),
            };
            // Every replica holds a batch of the same shape (the collective's contract).
            let count = world * x.elem_count() / self.channels;
            let (stats, mean, var) = moments_to_stats(&moments, count, self.opts.eps, sd)?;
            self.update_moving(&mean, &var)?;
            stats
        } else {
            let mm = self.moving_mean.as_tensor().detach().to_dtype(sd)?;
            let mv = self
                .moving_variance
                .as_tensor()
                .detach()
                .to_dtype(DType::F64)?;
            let inv = (mv + self.opts.eps)?.sqrt()?.recip()?.to_dtype(sd)?;
            Tensor::stack(&[mm, inv], 0)?
        };
        let gamma = self.gamma.to_dtype(sd)?;
        let beta = match &self.beta {
            Some(b) => b.to_dtype(sd)?,
            None => gamma.zeros_like()?.detach(),
        };
        let affine = Tensor::stack(&[gamma, beta], 0)?;
        if fold {
            let count = x.elem_count() / self.channels;
            bn_apply_add_local(x, &stats, &affine, residual, relu, count)
        } else {
            bn_apply_add(x, &stats, &affine, residual, relu)
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
