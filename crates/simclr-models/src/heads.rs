//! The projection head and the supervised head (the official tf2/model.py, `ProjectionHead` and `SupervisedHead`).
//!
//! Projection head, `nonlinear` mode, `L = num_proj_layers` layers `nl_0 .. nl_{L-1}`: each is a
//! dense layer without bias followed by BN. The middle layers keep the input width, have a BN
//! beta and a ReLU; the last maps to `proj_out_dim` and its BN has no beta and no ReLU.
//! `linear` mode is one layer `l_0` (dense to `proj_out_dim`, BN without beta); `none` has no
//! layer. Variables: `{nl_j|l_0}.dense.weight` (`[out, in]`) and `{nl_j|l_0}.bn.*`.
//!
//! `hiddens_list` has `L + 1` entries: `[0]` is the head input, `[j + 1]` the output of layer
//! `j` (after its ReLU if any); the last is `proj_head_output`.
//!
//! Supervised head: `head_supervised.{weight, bias}`, a dense layer with bias, N(0, 0.01) init.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::batch_norm::{BatchNorm, BatchNormOptions, BnMode};
use crate::config::{ModelConfig, ProjHeadMode};
use crate::layers::Dense;

#[derive(Debug, Clone)]
struct HeadLayer {
    dense: Dense,
    bn: BatchNorm,
    relu: bool,
}

/// The projection head.
#[derive(Debug, Clone)]
pub struct ProjectionHead {
    layers: Vec<HeadLayer>,
}

impl ProjectionHead {
    /// Builds the head for `config` (the model passes `vb.pp("projection_head")`).
    pub fn new(vb: VarBuilder, config: &ModelConfig) -> Result<Self> {
        let bn = BatchNormOptions::new(config.batch_norm_epsilon, config.batch_norm_decay);
        let d = config.feature_dim();
        let mut layers = Vec::new();
        match config.proj_head_mode {
            ProjHeadMode::None => {}
            ProjHeadMode::Linear => {
                let vb = vb.pp("l_0");
                layers.push(HeadLayer {
                    dense: Dense::new(vb.pp("dense"), d, config.proj_out_dim, false)?,
                    bn: BatchNorm::new(vb.pp("bn"), config.proj_out_dim, bn.center(false))?,
                    relu: false,
                });
            }
            ProjHeadMode::Nonlinear => {
                let n = config.num_proj_layers;
                for j in 0..n {
                    let last = j + 1 == n;
                    let out = if last { config.proj_out_dim } else { d };
                    let vb = vb.pp(format!("nl_{j}"));
                    layers.push(HeadLayer {
                        dense: Dense::new(vb.pp("dense"), d, out, false)?,
                        bn: BatchNorm::new(vb.pp("bn"), out, bn.center(!last))?,
                        relu: !last,
                    });
                }
            }
        }
        Ok(Self { layers })
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// `hiddens_list` for the head input `h` (`[N, feature_dim]`).
    pub fn forward<'a>(&self, h: &Tensor, mode: impl Into<BnMode<'a>>) -> Result<Vec<Tensor>> {
        let mode: BnMode = mode.into();
        let mut hiddens = Vec::with_capacity(self.layers.len() + 1);
        hiddens.push(h.clone());
        let mut y = h.clone();
        for layer in &self.layers {
            let z = layer.dense.forward(&y)?;
            y = if layer.relu {
                layer.bn.forward_relu(&z, mode)?
            } else {
                layer.bn.forward(&z, mode)?
            };
            hiddens.push(y.clone());
        }
        Ok(hiddens)
    }
}

/// The supervised (linear) head, `head_supervised`.
#[derive(Debug, Clone)]
pub struct SupervisedHead {
    dense: Dense,
}

impl SupervisedHead {
    /// A dense layer with bias from `in_dim` to `num_classes`.
    pub fn new(vb: VarBuilder, in_dim: usize, num_classes: usize) -> Result<Self> {
        Ok(Self {
            dense: Dense::new(vb, in_dim, num_classes, true)?,
        })
    }

    /// `logits_sup`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.dense.forward(x)
    }
}
