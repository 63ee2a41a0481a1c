//! Optimizers over named candle variables tagged with a parameter group.
//!
//! Each optimizer owns a list of [`NamedVar`]s. The group of a variable ([`ParamGroup`], the
//! table of `simclr-models`) decides weight decay and layer adaptation; the
//! [`ParamGroup::RunningStat`] variables (BN moving statistics) are dropped on construction since
//! no optimizer updates them.
//!
//! All arithmetic is candle tensor ops on the variable's device, in f32, with no host
//! synchronisation inside [`Optimizer::step`]. State tensors are replaced, never mutated, at every
//! step, so the tensors returned by [`Optimizer::state_tensors`] are snapshots.
//!
//! * [`Lars`]: the official LARS (the official tf2/lars_optimizer.py).
//! * [`MomentumSgd`]: the official `momentum` optimizer (Keras SGD, momentum 0.9, Nesterov) with
//!   L2 on every non-BN variable.
//! * [`AdamW`]: Adam with decoupled weight decay.

mod adamw;
mod lars;
mod sgd;

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};
use simclr_collective::Collective;
use simclr_models::{param_group, ParamGroup};

use crate::error::{Result, TrainError};

pub use adamw::{AdamW, AdamWConfig};
pub use lars::{Lars, LarsConfig, LarsRule, LarsRules};
pub use sgd::{MomentumConfig, MomentumSgd};

/// A trainable variable with its checkpoint name and parameter group.
#[derive(Debug, Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub group: ParamGroup,
}

impl NamedVar {
    /// Tags `var` with the group that [`param_group`] assigns to `name`.
    pub fn new(name: impl Into<String>, var: Var) -> Self {
        let name = name.into();
        let group = param_group(&name);
        Self { name, var, group }
    }

    /// Tags `var` with an explicit group.
    pub fn with_group(name: impl Into<String>, var: Var, group: ParamGroup) -> Self {
        Self {
            name: name.into(),
            var,
            group,
        }
    }
}

/// The trainable variables of a `VarMap`, sorted by name and tagged by [`param_group`]
/// (moving statistics left out).
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<NamedVar> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<NamedVar> = data
        .iter()
        .map(|(name, var)| NamedVar::new(name.clone(), var.clone()))
        .filter(|v| v.group.is_trainable())
        .collect();
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    vars
}

/// Sums the gradient of every variable in `vars` over the replicas of `replicas`, in place
/// (data parallelism: each replica's loss is its share of the global mean, so the sum is the
/// gradient of the global loss). Every replica must pass the same variables in the same order
/// ([`named_vars`] sorts them); a variable without a gradient is skipped (by every replica).
pub fn all_reduce_gradients(
    grads: &mut GradStore,
    vars: &[NamedVar],
    replicas: &dyn Collective,
) -> Result<()> {
    if replicas.world_size() == 1 {
        return Ok(());
    }
    for v in vars {
        let t = v.var.as_tensor();
        // Replicas build identical graphs, so every one of them skips the same variables; a
        // zero gradient inserted here would make the optimizer decay a variable that one
        // replica alone would leave untouched.
        let Some(local) = grads.get(t).map(|g| g.detach()) else {
            continue;
        };
        let total = replicas.all_reduce_sum(&local)?;
        grads.insert(t, total);
    }
    Ok(())
}

/// What one optimizer step did, for logging.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// The learning rate the step used.
    pub lr: f64,
    /// Variables updated (those with a gradient in the store).
    pub num_updated: usize,
    /// `½ · wd · Σ w²` over the variables this optimizer regularises, with the weights before the
    /// update: a 0-dimensional f32 tensor on the variables' device (read it with
    /// [`StepStats::weight_decay_loss_value`], which synchronises with the device).
    /// For LARS this covers the decayed (adapted) variables and the supervised head's kernel,
    /// for momentum SGD every non-BN variable, for AdamW the decayed variables.
    pub weight_decay_loss: Tensor,
}

impl StepStats {
    /// The weight-decay term as a number.
    pub fn weight_decay_loss_value(&self) -> Result<f64> {
        Ok(self
            .weight_decay_loss
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }
}

/// An optimizer over a fixed list of named variables.
pub trait Optimizer: Send {
    /// Applies one update with learning rate `lr`. Variables without a gradient in `grads` are
    /// left alone, their state included.
    fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepStats>;

    /// The optimizer's state, keyed by stable names (`<optimizer>/<slot>/<variable name>`).
    fn state_tensors(&self) -> Vec<(String, Tensor)>;

    /// Restores the state written by [`Optimizer::state_tensors`]. Every key this optimizer needs
    /// must be present with the right shape; other keys are ignored, so the map may also hold
    /// model variables.
    fn load_state_tensors(&mut self, map: &HashMap<String, Tensor>) -> Result<()>;

    /// The variables this optimizer updates.
    fn vars(&self) -> &[NamedVar];
}

/// The optimizer flag (`--optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// [`Lars`] (the official default).
    #[default]
    Lars,
    /// [`MomentumSgd`] with Nesterov.
    Momentum,
    /// [`AdamW`].
    AdamW,
}

impl OptimizerKind {
    /// Every optimizer, by its flag value.
    pub const ALL: [(&'static str, OptimizerKind); 3] = [
        ("lars", OptimizerKind::Lars),
        ("momentum", OptimizerKind::Momentum),
        ("adamw", OptimizerKind::AdamW),
    ];
}

impl std::str::FromStr for OptimizerKind {
    type Err = String;

    /// `lars`, `momentum` or `adamw`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .iter()
            .find(|(name, _)| *name == s)
            .map(|(_, k)| *k)
            .ok_or_else(|| format!("{s:?}: expected lars, momentum or adamw"))
    }
}

/// The optimizer flags of a run, official names and defaults (`momentum` 0.9, `weight_decay`
/// 1e-6, LARS `eeta` 0.001 without Nesterov).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OptimizerSettings {
    pub optimizer: OptimizerKind,
    pub momentum: f64,
    pub weight_decay: f64,
    pub eeta: f64,
    /// Nesterov momentum for LARS (the momentum optimizer always uses it, as officially).
    pub lars_nesterov: bool,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_eps: f64,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        let adam = AdamWConfig::default();
        Self {
            optimizer: OptimizerKind::Lars,
            momentum: 0.9,
            weight_decay: 1e-6,
            eeta: 0.001,
            lars_nesterov: false,
            adam_beta1: adam.beta1,
            adam_beta2: adam.beta2,
            adam_eps: adam.eps,
        }
    }
}

/// Builds the optimizer `settings.optimizer` over `vars`.
pub fn build_optimizer(
    vars: Vec<NamedVar>,
    settings: &OptimizerSettings,
) -> Result<Box<dyn Optimizer>> {
    Ok(match settings.optimizer {
        OptimizerKind::Lars => Box::new(Lars::new(
            vars,
            LarsConfig {
                momentum: settings.momentum,
                weight_decay: settings.weight_decay,
                eeta: settings.eeta,
                use_nesterov: settings.lars_nesterov,
                ..LarsConfig::default()
            },
        )?),
        OptimizerKind::Momentum => Box::new(MomentumSgd::new(
            vars,
            MomentumConfig {
                momentum: settings.momentum,
                weight_decay: settings.weight_decay,
                nesterov: true,
            },
        )?),
        OptimizerKind::AdamW => Box::new(AdamW::new(
            vars,
            AdamWConfig {
                beta1: settings.adam_beta1,
                beta2: settings.adam_beta2,
                eps: settings.adam_eps,
                weight_decay: settings.weight_decay,
            },
        )?),
    })
}

// ---- helpers shared by the optimizers ----

/// One state slot per variable (a momentum buffer), keyed by `key(variable name)`.
fn slot_tensors(
    vars: &[NamedVar],
    slots: &[Tensor],
    key: impl Fn(&str) -> String,
) -> Vec<(String, Tensor)> {
    vars.iter()
        .zip(slots)
        .map(|(v, s)| (key(&v.name), s.clone()))
        .collect()
}

/// Reads back what [`slot_tensors`] wrote; every slot must be present with its variable's shape.
fn load_slots(
    map: &HashMap<String, Tensor>,
    vars: &[NamedVar],
    key: impl Fn(&str) -> String,
) -> Result<Vec<Tensor>> {
    vars.iter()
        .map(|v| load_slot(map, &key(&v.name), v.var.as_tensor()))
        .collect()
}

/// Drops moving statistics, checks dtypes and name uniqueness.
fn prepare_vars(vars: Vec<NamedVar>) -> Result<Vec<NamedVar>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(vars.len());
    for v in vars {
        if !v.group.is_trainable() {
            continue;
        }
        if v.var.dtype() != DType::F32 {
            return Err(TrainError::UnsupportedDType {
                name: v.name,
                dtype: v.var.dtype(),
            });
        }
        if !seen.insert(v.name.clone()) {
            return Err(TrainError::DuplicateVar(v.name));
        }
        out.push(v);
    }
    Ok(out)
}

fn check_hyper(name: &str, value: f64, lo: f64, hi: f64) -> Result<()> {
    if value.is_finite() && value >= lo && value <= hi {
        Ok(())
    } else {
        Err(TrainError::InvalidConfig(format!(
            "{name} = {value} is outside [{lo}, {hi}]"
        )))
    }
}

/// A zero state buffer shaped like `var`, on its device.
fn zeros_like_var(var: &Var) -> Result<Tensor> {
    Ok(Tensor::zeros(var.shape(), DType::F32, var.device())?)
}

/// Takes `key` from `map`, checked against the shape of `like`, as a fresh f32 tensor on `like`'s
/// device.
fn load_slot(map: &HashMap<String, Tensor>, key: &str, like: &Tensor) -> Result<Tensor> {
    let t = map.get(key).ok_or_else(|| TrainError::MissingState {
        key: key.to_string(),
    })?;
    if t.dims() != like.dims() {
        return Err(TrainError::StateShape {
            key: key.to_string(),
            expected: like.dims().to_vec(),
            found: t.dims().to_vec(),
        });
    }
    Ok(t.detach()
        .to_device(like.device())?
        .to_dtype(DType::F32)?
        .copy()?)
}

/// Sums 0-dimensional f32 terms into one on `device` (0 when there are none).
fn sum_scalars(terms: Vec<Tensor>, device: &Device) -> Result<Tensor> {
    let mut acc = Tensor::zeros((), DType::F32, device)?;
    for t in terms {
        acc = (acc + t.to_device(device)?)?;
    }
    Ok(acc)
}

/// The device of the first variable (CPU when there are none).
fn first_device(vars: &[NamedVar]) -> Device {
    vars.first()
        .map(|v| v.var.device().clone())
        .unwrap_or(Device::Cpu)
}
