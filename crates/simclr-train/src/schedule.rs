//! Learning-rate scaling, step arithmetic and the warmup-then-cosine schedule (the official tf2/model.py, `WarmUpAndCosineDecay`).
//!
//! The arithmetic follows the official TF2 code so that its step counts are reproduced exactly:
//!
//! * `scaled_lr = base_lr · B / 256` (linear) or `base_lr · √B` (sqrt), B the **global** batch;
//! * `train_steps = num_examples · epochs // B + 1` unless an explicit step count is given;
//! * `warmup_steps = int(round(warmup_epochs · num_examples // B))`, where `//` is Python's
//!   floor division of a float product;
//! * lr(step) = `step / warmup_steps · scaled_lr` during warmup, then a cosine decay from
//!   `scaled_lr` to 0 over `train_steps − warmup_steps` steps, no restarts, 0 afterwards.
//!
//! The released checkpoints' global steps (the official README's fine-tuning commands) are reproduced by [`train_steps`];
//! see the tests.

use serde::{Deserialize, Serialize};

use crate::error::{Result, TrainError};

/// How the base learning rate grows with the global batch size (`--learning_rate_scaling`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LearningRateScaling {
    /// `base_lr · B / 256` (the official default).
    #[default]
    Linear,
    /// `base_lr · √B`, which the official README recommends for small batches.
    Sqrt,
}

impl LearningRateScaling {
    /// The flag value: `"linear"` or `"sqrt"`.
    pub fn as_str(self) -> &'static str {
        match self {
            LearningRateScaling::Linear => "linear",
            LearningRateScaling::Sqrt => "sqrt",
        }
    }
}

impl std::fmt::Display for LearningRateScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for LearningRateScaling {
    type Err = TrainError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(LearningRateScaling::Linear),
            "sqrt" => Ok(LearningRateScaling::Sqrt),
            other => Err(TrainError::InvalidConfig(format!(
                "unknown learning-rate scaling `{other}` (expected `linear` or `sqrt`)"
            ))),
        }
    }
}

/// The peak learning rate for a global batch of `global_batch` examples.
pub fn scaled_lr(base_lr: f64, global_batch: usize, scaling: LearningRateScaling) -> f64 {
    let b = global_batch as f64;
    match scaling {
        LearningRateScaling::Linear => base_lr * b / 256.0,
        LearningRateScaling::Sqrt => base_lr * b.sqrt(),
    }
}

/// Total optimizer steps: `explicit` when it is `Some(n)` with `n > 0`, otherwise
/// `num_examples · epochs // batch + 1` (integer division; the official `train_steps or …`, so an
/// explicit 0 also means "derive it").
pub fn train_steps(
    num_examples: u64,
    epochs: u64,
    batch: u64,
    explicit: Option<u64>,
) -> Result<u64> {
    if let Some(n) = explicit.filter(|&n| n > 0) {
        return Ok(n);
    }
    if batch == 0 {
        return Err(TrainError::InvalidConfig(
            "batch size must be positive".into(),
        ));
    }
    let seen = num_examples.checked_mul(epochs).ok_or_else(|| {
        TrainError::InvalidConfig(format!(
            "{num_examples} examples × {epochs} epochs overflows"
        ))
    })?;
    Ok(seen / batch + 1)
}

/// Warmup steps: `int(round(warmup_epochs · num_examples // batch))` with Python's float floor
/// division, so fractional warmup epochs behave as in the official code.
pub fn warmup_steps(warmup_epochs: f64, num_examples: u64, batch: u64) -> Result<u64> {
    if batch == 0 {
        return Err(TrainError::InvalidConfig(
            "batch size must be positive".into(),
        ));
    }
    if !(warmup_epochs.is_finite() && warmup_epochs >= 0.0) {
        return Err(TrainError::InvalidConfig(format!(
            "warmup epochs must be finite and non-negative, got {warmup_epochs}"
        )));
    }
    let product = warmup_epochs * num_examples as f64;
    let steps = python_float_floordiv(product, batch as f64).round_ties_even();
    Ok(steps as u64)
}

/// Python's `a // b` for floats with `a ≥ 0`, `b > 0`: the quotient is taken from
/// `(a − fmod(a, b)) / b` and rounded to the nearest integer not above the exact quotient, which
/// can differ from `floor(a / b)` when `a / b` rounds up to an integer.
fn python_float_floordiv(a: f64, b: f64) -> f64 {
    let rem = a % b;
    let div = (a - rem) / b;
    if div == 0.0 {
        return 0.0;
    }
    let floor = div.floor();
    if div - floor > 0.5 {
        floor + 1.0
    } else {
        floor
    }
}

/// Linear warmup to `scaled_lr`, then cosine decay to 0 (the official `WarmUpAndCosineDecay`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WarmupCosine {
    /// Peak learning rate, reached at the end of warmup.
    pub scaled_lr: f64,
    /// Steps of linear warmup; 0 means none.
    pub warmup_steps: u64,
    /// Total steps; the cosine spans `total_steps − warmup_steps`.
    pub total_steps: u64,
}

impl WarmupCosine {
    pub fn new(scaled_lr: f64, warmup_steps: u64, total_steps: u64) -> Self {
        Self {
            scaled_lr,
            warmup_steps,
            total_steps,
        }
    }

    /// The learning rate to use for the update at global step `step` (0-based, the value of the
    /// step counter before the update, as in the official code).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps as f64 * self.scaled_lr;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        if decay_steps == 0 {
            // Nothing left to decay over (the official code would divide by zero here).
            return 0.0;
        }
        let t = (step - self.warmup_steps).min(decay_steps) as f64 / decay_steps as f64;
        self.scaled_lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// The schedule flags of a run (official names and defaults: `learning_rate` 0.3,
/// `learning_rate_scaling` linear, `warmup_epochs` 10, `train_epochs` 100, `train_steps` unset).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LrScheduleConfig {
    /// Base learning rate before scaling with the batch.
    pub learning_rate: f64,
    pub learning_rate_scaling: LearningRateScaling,
    /// Warmup length in epochs (may be fractional).
    pub warmup_epochs: f64,
    pub train_epochs: u64,
    /// Overrides the step count derived from the epochs when set (and non-zero).
    pub train_steps: Option<u64>,
}

impl Default for LrScheduleConfig {
    fn default() -> Self {
        Self {
            learning_rate: 0.3,
            learning_rate_scaling: LearningRateScaling::Linear,
            warmup_epochs: 10.0,
            train_epochs: 100,
            train_steps: None,
        }
    }
}

impl LrScheduleConfig {
    /// The schedule for `num_examples` training examples at global batch `global_batch`.
    pub fn build(&self, num_examples: u64, global_batch: u64) -> Result<WarmupCosine> {
        if !(self.learning_rate.is_finite() && self.learning_rate >= 0.0) {
            // A negative rate would climb the loss without any other sign of trouble.
            return Err(TrainError::InvalidConfig(format!(
                "learning_rate must be a finite number >= 0, got {}",
                self.learning_rate
            )));
        }
        if self.train_steps == Some(0) {
            // The official flag's 0 means "derive from the epochs"; here that is `None`, and a
            // 0 that was meant as a number would silently train for the epochs instead.
            return Err(TrainError::InvalidConfig(
                "train_steps must be at least 1 (leave it unset to derive it from train_epochs)"
                    .into(),
            ));
        }
        let total = train_steps(
            num_examples,
            self.train_epochs,
            global_batch,
            self.train_steps,
        )?;
        let warmup = warmup_steps(self.warmup_epochs, num_examples, global_batch)?;
        let lr = scaled_lr(
            self.learning_rate,
            global_batch as usize,
            self.learning_rate_scaling,
        );
        Ok(WarmupCosine::new(lr, warmup, total))
    }
}
