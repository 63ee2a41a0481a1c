//! LARS as the official TF2 `LARSOptimizer` computes it (the official tf2/lars_optimizer.py).
//!
//! Per variable, with momentum `m`, weight decay `wd`, LARS coefficient `eeta`:
//!
//! 1. decayed groups: `g ← g + wd·w`;
//! 2. the supervised head's kernel, which the official code excludes from LARS but whose
//!    `wd · ½Σw²` it adds to the loss: `g ← g + wd·w` as well (its bias gets nothing);
//! 3. adapted groups: `trust = eeta·‖w‖/‖g‖` with the decayed `g` (1 when either norm is 0);
//!    other groups: `trust = 1`;
//! 4. classic momentum (the default): `v ← m·v + (lr·trust)·g`, `w ← w − v`, or with Nesterov
//!    `w ← w − (m·v + (lr·trust)·g)`. **The learning rate sits inside the buffer**, unlike the
//!    usual PyTorch LARS (`v ← m·v + trust·g; w ← w − lr·v`): they differ whenever lr changes.
//!
//! With `classic_momentum = false` (the official non-default branch) the buffer holds raw
//! gradients, `v ← m·v + g`, the update `u = v` (Nesterov: `m·v + g`), the trust ratio is
//! `eeta·‖w‖/‖u‖`, and `w ← w − lr·trust·u`.

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

/// How LARS treats one parameter group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LarsRule {
    /// Add `wd·w` to the gradient inside the optimizer (before the trust ratio).
    pub decay: bool,
    /// Scale the learning rate by the trust ratio.
    pub adapt: bool,
    /// Add `wd·w` to the gradient as the gradient of an L2 loss term `wd·½Σw²` (the official
    /// `add_weight_decay` for the supervised head under LARS).
    pub l2_in_loss: bool,
}

/// The LARS rule of each parameter group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LarsRules {
    pub adapted: LarsRule,
    pub batch_norm: LarsRule,
    pub bias: LarsRule,
    pub supervised_head: LarsRule,
}

impl LarsRules {
    /// The official table: `exclude_from_weight_decay = exclude_from_layer_adaptation =
    /// ['batch_normalization', 'bias', 'head_supervised']`, plus the L2 loss term on the
    /// supervised head's kernel.
    pub const OFFICIAL: LarsRules = LarsRules {
        adapted: LarsRule {
            decay: true,
            adapt: true,
            l2_in_loss: false,
        },
        batch_norm: LarsRule {
            decay: false,
            adapt: false,
            l2_in_loss: false,
        },
        bias: LarsRule {
            decay: false,
            adapt: false,
            l2_in_loss: false,
        },
        supervised_head: LarsRule {
            decay: false,
            adapt: false,
            l2_in_loss: true,
        },
    };

    /// The rule of `group`; `None` for variables no optimizer updates (moving statistics).
    pub fn rule(&self, group: ParamGroup) -> Option<LarsRule> {
        match group {
            ParamGroup::Adapted => Some(self.adapted),
            ParamGroup::BatchNorm => Some(self.batch_norm),
            ParamGroup::Bias => Some(self.bias),
            ParamGroup::SupervisedHead => Some(self.supervised_head),
            ParamGroup::RunningStat => None,
        }
    }
}

impl Default for LarsRules {
    fn default() -> Self {
        Self::OFFICIAL
    }
}

/// LARS hyperparameters (official defaults: momentum 0.9, eeta 0.001, no Nesterov, classic
/// momentum, weight decay 1e-6 as the TF2 `--weight_decay` flag).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LarsConfig {
    pub momentum: f64,
    pub weight_decay: f64,
    pub eeta: f64,
    pub use_nesterov: bool,
    pub classic_momentum: bool,
    pub rules: LarsRules,
}

impl Default for LarsConfig {
    fn default() -> Self {
        Self {
            momentum: 0.9,
            weight_decay: 1e-6,
            eeta: 0.001,
            use_nesterov: false,
            classic_momentum: true,
            rules: LarsRules::OFFICIAL,
        }
    }
}

/// The official LARS optimizer.
pub struct Lars {
    vars: Vec<NamedVar>,
    rules: Vec<LarsRule>,
    momentum: Vec<Tensor>,
    config: LarsConfig,
}

impl Lars {
    /// LARS over `vars` (moving statistics are dropped; every other variable must be f32).
    pub fn new(vars: Vec<NamedVar>, config: LarsConfig) -> Result<Self> {
        check_hyper("momentum", config.momentum, 0.0, 1.0)?;
        check_hyper("weight_decay", config.weight_decay, 0.0, f64::MAX)?;
        check_hyper("eeta", config.eeta, 0.0, f64::MAX)?;
        let vars = prepare_vars(vars)?;
        let rules = vars
            .iter()
            .map(|v| {
                config
                    .rules
                    .rule(v.group)
                    .expect("prepare_vars keeps trainable groups only")
            })
            .collect();
        let momentum = vars
            .iter()
            .map(|v| zeros_like_var(&v.var))
            .collect::<Result<_>>()?;
        Ok(Self {
            vars,
            rules,
            momentum,
            config,
        })
    }

    pub fn config(&self) -> &LarsConfig {
        &self.config
    }

    /// The rule applied to each variable, in the order of [`Optimizer::vars`].
    pub fn rules(&self) -> &[LarsRule] {
        &self.rules
    }

    fn state_key(name: &str) -> String {
        format!("lars/momentum/{name}")
    }
}

/// `eeta·‖w‖/‖x‖` where both norms are positive, 1 otherwise (0-dimensional tensors).
fn trust_ratio(eeta: f64, w_norm: &Tensor, x_norm: &Tensor) -> Result<Tensor> {
    let both_positive = w_norm.gt(0.0)?.mul(&x_norm.gt(0.0)?)?;
    let ratio = w_norm.affine(eeta, 0.0)?.div(x_norm)?;
    Ok(both_positive.where_cond(&ratio, &w_norm.ones_like()?)?)
}

fn l2_norm(t: &Tensor) -> Result<Tensor> {
    Ok(t.sqr()?.sum_all()?.sqrt()?)
}

impl Optimizer for Lars {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let LarsConfig {
            momentum: m,
            weight_decay: wd,
            eeta,
            use_nesterov,
            classic_momentum,
            ..
        } = self.config;
        let mut num_updated = 0;
        let mut wd_terms = Vec::new();
        for ((v, rule), buf) in self
            .vars
            .iter()
            .zip(&self.rules)
            .zip(self.momentum.iter_mut())
        {
            let Some(grad) = grads.get(v.var.as_tensor()) else {
                continue;
            };
            let w = v.var.as_detached_tensor();
            let mut g = grad.detach();
            let regularised = wd != 0.0 && (rule.decay || rule.l2_in_loss);
            let w_sq = if regularised || rule.adapt {
                Some(w.sqr()?.sum_all()?)
            } else {
                None
            };
            if regularised {
                if let Some(w_sq) = &w_sq {
                    wd_terms.push(w_sq.affine(0.5 * wd, 0.0)?);
                }
                if rule.l2_in_loss {
                    g = (g + w.affine(wd, 0.0)?)?;
                }
                if rule.decay {
                    g = (g + w.affine(wd, 0.0)?)?;
                }
            }
            let w_norm = match (&w_sq, rule.adapt) {
                (Some(s), true) => Some(s.sqrt()?),
                _ => None,
            };

            let (next_v, delta) = if classic_momentum {
                let scaled_g = match &w_norm {
                    Some(w_norm) => {
                        let trust = trust_ratio(eeta, w_norm, &l2_norm(&g)?)?;
                        g.broadcast_mul(&trust.affine(lr, 0.0)?)?
                    }
                    None => g.affine(lr, 0.0)?,
                };
                let next_v = (buf.affine(m, 0.0)? + &scaled_g)?;
                let delta = if use_nesterov {
                    (next_v.affine(m, 0.0)? + scaled_g)?
                } else {
                    next_v.clone()
                };
                (next_v, delta)
            } else {
                let next_v = (buf.affine(m, 0.0)? + &g)?;
                let update = if use_nesterov {
                    (next_v.affine(m, 0.0)? + &g)?
                } else {
                    next_v.clone()
                };
                let delta = match &w_norm {
                    Some(w_norm) => {
                        let trust = trust_ratio(eeta, w_norm, &l2_norm(&update)?)?;
                        update.broadcast_mul(&trust.affine(lr, 0.0)?)?
                    }
                    None => update.affine(lr, 0.0)?,
                };
                (next_v, delta)
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
