//! Adam with decoupled weight decay (AdamW), in the usual PyTorch form.
//!
//! Per variable, at its `t`-th update (`t` counted per variable, from 1):
//! `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
//! decayed groups: `w ← w·(1 − lr·wd)`, then
//! `w ← w − (lr / (1−β1ᵗ)) · m / (√v / √(1−β2ᵗ) + eps)`.
//!
//! Decay applies to kernels (adapted and supervised-head groups), not to batch norm or biases.
//! The official code's `adam` is plain Adam with an L2 loss term; this is the decoupled variant.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use simclr_models::ParamGroup;

use super::{
    check_hyper, first_device, load_slot, prepare_vars, sum_scalars, zeros_like_var, NamedVar,
    Optimizer, StepStats,
};
use crate::error::{Result, TrainError};

/// AdamW hyperparameters (defaults β 0.9 / 0.999, eps 1e-8, weight decay 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled decay coefficient, multiplied by the learning rate.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether AdamW decays a group: kernels only.
pub fn adamw_decays(group: ParamGroup) -> bool {
    matches!(group, ParamGroup::Adapted | ParamGroup::SupervisedHead)
}

/// AdamW over named variables.
pub struct AdamW {
    vars: Vec<NamedVar>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    steps: Vec<u64>,
    config: AdamWConfig,
}

impl AdamW {
    pub fn new(vars: Vec<NamedVar>, config: AdamWConfig) -> Result<Self> {
        check_hyper("beta1", config.beta1, 0.0, 1.0 - f64::EPSILON)?;
        check_hyper("beta2", config.beta2, 0.0, 1.0 - f64::EPSILON)?;
        check_hyper("eps", config.eps, 0.0, f64::MAX)?;
        check_hyper("weight_decay", config.weight_decay, 0.0, f64::MAX)?;
        let vars = prepare_vars(vars)?;
        let first = vars
            .iter()
            .map(|v| zeros_like_var(&v.var))
            .collect::<Result<_>>()?;
        let second = vars
            .iter()
            .map(|v| zeros_like_var(&v.var))
            .collect::<Result<_>>()?;
        let steps = vec![0; vars.len()];
        Ok(Self {
            vars,
            first,
            second,
            steps,
            config,
        })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// How many updates each variable has received, in the order of [`Optimizer::vars`].
    pub fn steps(&self) -> &[u64] {
        &self.steps
    }

    fn key(slot: &str, name: &str) -> String {
        format!("adamw/{slot}/{name}")
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay: wd,
        } = self.config;
        let mut num_updated = 0;
        let mut wd_terms = Vec::new();
        for (i, v) in self.vars.iter().enumerate() {
            let Some(grad) = grads.get(v.var.as_tensor()) else {
                continue;
            };
            let g = grad.detach();
            let mut w = v.var.as_detached_tensor();
            let t = self.steps[i] + 1;
            let m = (self.first[i].affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
            let s = (self.second[i].affine(beta2, 0.0)? + g.sqr()?.affine(1.0 - beta2, 0.0)?)?;
            if wd != 0.0 && adamw_decays(v.group) {
                wd_terms.push(w.sqr()?.sum_all()?.affine(0.5 * wd, 0.0)?);
                w = w.affine(1.0 - lr * wd, 0.0)?;
            }
            let bc1 = 1.0 - beta1.powf(t as f64);
            let bc2 = 1.0 - beta2.powf(t as f64);
            let denom = s.sqrt()?.affine(1.0 / bc2.sqrt(), eps)?;
            let delta = m.div(&denom)?.affine(lr / bc1, 0.0)?;
            v.var.set(&(w - delta)?)?;
            self.first[i] = m;
            self.second[i] = s;
            self.steps[i] = t;
            num_updated += 1;
        }
        Ok(StepStats {
            lr,
            num_updated,
            weight_decay_loss: sum_scalars(wd_terms, &first_device(&self.vars))?,
        })
    }

    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(3 * self.vars.len());
        for (i, v) in self.vars.iter().enumerate() {
            out.push((Self::key("m", &v.name), self.first[i].clone()));
            out.push((Self::key("v", &v.name), self.second[i].clone()));
            // Step counts stay on the CPU; i64 holds any realistic count exactly.
            let count = Tensor::new(&[self.steps[i] as i64], &Device::Cpu)
                .expect("a one-element CPU tensor");
            out.push((Self::key("step", &v.name), count));
        }
        out
    }

    fn load_state_tensors(&mut self, map: &HashMap<String, Tensor>) -> Result<()> {
        let mut first = Vec::with_capacity(self.vars.len());
        let mut second = Vec::with_capacity(self.vars.len());
        let mut steps = Vec::with_capacity(self.vars.len());
        for v in &self.vars {
            first.push(load_slot(map, &Self::key("m", &v.name), v.var.as_tensor())?);
            second.push(load_slot(map, &Self::key("v", &v.name), v.var.as_tensor())?);
            let key = Self::key("step", &v.name);
            let count = map
                .get(&key)
                .ok_or_else(|| TrainError::MissingState { key: key.clone() })?;
            if count.dims() != [1] {
                return Err(TrainError::StateShape {
                    key,
                    expected: vec![1],
                    found: count.dims().to_vec(),
                });
            }
            let count = count.to_dtype(DType::I64)?.to_vec1::<i64>()?[0];
            if count < 0 {
                return Err(TrainError::InvalidConfig(format!(
                    "optimizer state `{key}` holds a negative step count {count}"
                )));
            }
            steps.push(count as u64);
        }
        self.first = first;
        self.second = second;
        self.steps = steps;
        Ok(())
    }

    fn vars(&self) -> &[NamedVar] {
        &self.vars
    }
}
