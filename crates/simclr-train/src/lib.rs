//! Shared training machinery of simclr-rs.
//!
//! This crate owns what every training mode (contrastive pretraining, fine-tuning, linear
//! evaluation, distillation) has in common:
//!
//! * the optimizers, over a list of named candle [`Var`](candle_core::Var)s tagged with a
//!   parameter group: LARS exactly as the official TF2 code (learning rate inside the momentum
//!   buffer, weight decay before the trust ratio, batch norm / biases / the supervised head
//!   excluded through an explicit table), momentum SGD with Nesterov as the official `momentum`
//!   optimizer, and AdamW ([`optim`]);
//! * the checkpointable state of those optimizers, so a resumed run continues bit-identically
//!   on CPU ([`optim::Optimizer::state_tensors`], [`optim::Optimizer::load_state_tensors`]);
//! * learning-rate scaling (linear or square root of the global batch), the official step
//!   arithmetic and the linear-warmup-then-cosine schedule ([`schedule`]).
//!
//! * the training loop every stage runs ([`trainer`]): schedule, backward, optimizer step, the
//!   non-finite-loss guard, JSONL metrics and their TensorBoard twin ([`tensorboard`]), the
//!   progress bar, atomic checkpoints holding the model,
//!   the optimizer state and the step (which fixes the data position and every random draw), and
//!   resumption.
//!
//! It does not own the networks or their parameter-group table (`simclr-models`, whose
//! [`ParamGroup`] is re-exported here), data loading and augmentation (`simclr-data`), nor the
//! losses.
//!
//! ```
//! use candle_core::{DType, Device, Var};
//! use simclr_train::optim::{Lars, LarsConfig, NamedVar, Optimizer};
//! use simclr_train::schedule::{scaled_lr, LearningRateScaling, WarmupCosine};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let w = Var::ones((4, 3), DType::F32, &Device::Cpu)?;
//! let vars = vec![NamedVar::new("projection_head.linear_0.weight", w.clone())];
//! let mut opt = Lars::new(vars, LarsConfig { weight_decay: 1e-6, ..LarsConfig::default() })?;
//! let schedule = WarmupCosine::new(scaled_lr(0.3, 512, LearningRateScaling::Linear), 10, 100);
//!
//! let loss = w.as_tensor().sqr()?.sum_all()?;
//! let grads = loss.backward()?;
//! let stats = opt.step(&grads, schedule.lr(3))?;
//! assert_eq!(stats.num_updated, 1);
//! # Ok(()) }
//! ```

pub mod error;
pub mod optim;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use error::{Result, TrainError};
pub use optim::{
    all_reduce_gradients, build_optimizer, named_vars, AdamW, AdamWConfig, Lars, LarsConfig,
    LarsRule, LarsRules, MomentumConfig, MomentumSgd, NamedVar, Optimizer, OptimizerKind,
    OptimizerSettings, StepStats,
};
pub use schedule::{
    scaled_lr, train_steps, warmup_steps, LearningRateScaling, LrScheduleConfig, WarmupCosine,
};
pub use simclr_models::{param_group, ParamGroup, Stage};
pub use trainer::{
    batch_accuracy, run_stage, stage_meta, train, RunOptions, StageEnv, StageRun, StageSettings,
    StepOutput, TrainSummary, TrainTask, TrainerConfig, CHECKPOINT_FILE, KEEP_CHECKPOINT_MAX,
};
