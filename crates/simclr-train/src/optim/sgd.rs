//! Momentum SGD as the official `--optimizer=momentum` (Keras `SGD(lr, 0.9, nesterov=True)`,
//! with `wd · ½Σw²` of every non-BN variable added to the loss).
//!
//! Per variable, with `g` the gradient plus `wd·w` for every group except batch norm:
//! `v ← m·v + lr·g`, then `w ← w − (m·v + lr·g)` with Nesterov or `w ← w − v` without. As in
//! Keras the learning rate is inside the buffer (Keras stores `−v`; this buffer holds `+v`).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use simclr_models::ParamGroup;

use super::{
    check_hyper, first_device, load_slots, prepare_vars, slot_tensors, sum_scalars, zeros_like_var,
    NamedVar, Optimizer, StepStats,
};
use crate::error::Result;

/// Momentum SGD hyperparameters (official: momentum 0.9, Nesterov, `--weight_decay`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MomentumConfig {
    pub momentum: f64,
    /// L2 coefficient: `wd·w` is added to the gradient of every non-BN variable.
    pub weight_decay: f64,
    pub nesterov: bool,
}

impl Default for MomentumConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 1e-6,
            nesterov: true,
        }
    }
}

/// Whether the official `momentum` optimizer regularises a group: everything but batch norm.
pub fn momentum_decays(group: ParamGroup) -> bool {
    !matches!(group, ParamGroup::BatchNorm | ParamGroup::RunningStat)
}

/// The official momentum (Nesterov) SGD.
pub struct MomentumSgd {
    vars: Vec<NamedVar>,
    momentum: Vec<Tensor>,
    config: MomentumConfig,
}

impl MomentumSgd {
    pub fn new(vars: Vec<NamedVar>, config: MomentumConfig) -> Result<Self> {
        check_hyper("momentum", config.momentum, 0.0, 1.0)?;
        check_hyper("weight_decay", config.weight_decay, 0.0, f64::MAX)?;
        let vars = prepare_vars(vars)?;
        let momentum = vars
            .iter()
            .map(|v| zeros_like_var(&v.var))
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            momentum,
            config,
        })
    }

    pub fn config(&self) -> &MomentumConfig {
        &self.config
    }

    fn state_key(name: &str) -> String {
        format!("momentum/momentum/{name}")
    }
}

impl Optimizer for MomentumSgd {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let MomentumConfig {
            momentum: m,
            weight_decay: wd,
            nesterov,
        } = self.config;
        let mut num_updated = 0;
        let mut wd_terms = Vec::new();
        for (v, buf) in self.vars.iter().zip(self.momentum.iter_mut()) {
            let Some(grad) = grads.get(v.var.as_tensor()) else {
                continue;
            };
            let w = v.var.as_detached_tensor();
            let mut g = grad.detach();
            if wd != 0.0 && momentum_decays(v.group) {
                wd_terms.push(w.sqr()?.sum_all()?.affine(0.5 * wd, 0.0)?);
                g = (g + w.affine(wd, 0.0)?)?;
            }
            let scaled_g = g.affine(lr, 0.0)?;
            let next_v = (buf.affine(m, 0.0)? + &scaled_g)?;
            let delta = if nesterov {
                (next_v.affine(m, 0.0)? + scaled_g)?
            } else {
                next_v.clone()
            };
            v.var.set(&(w - delta)?)?;
            *buf = next_v;
            num_updated += 1;
        }
        Ok(StepStats {
            lr,
            num_updated,
            weight_decay_loss: sum_scalars(wd_terms, &first_device(&self.vars))?,
        })
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        slot_tensors(&self.vars, &self.momentum, Self::state_key)
    }

    fn load_state_tensors(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        self.momentum = load_slots(map, &self.vars, Self::state_key)?;
        Ok(())
    }

    fn vars(&self) -> &[NamedVar] {
        &self.vars
    }
}
