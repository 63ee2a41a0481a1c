//! The training loop every stage runs: pretraining, fine-tuning, distillation.
//!
//! A stage supplies a [`TrainTask`] (its forward pass and loss, plus optional hooks); the loop
//! owns everything else: the learning-rate schedule, backward and the optimizer step, the
//! non-finite-loss and divergence guards, the folder lock, metrics (JSONL), the progress bar,
//! periodic and final checkpoints (only of finite state), and
//! resumption.
//!
//! A training checkpoint is one safetensors file: the model's variables (so every later stage can
//! read it as a model) plus the optimizer state and the task's extra state under
//! `train_state/…`, and in its metadata the step. Everything random in a run derives from
//! `(seed, epoch, position)` (see `simclr_data::loader`), so the step alone fixes the data position
//! and the augmentations: a resumed run on CPU repeats the uninterrupted run's losses exactly.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Map, Value};
use simclr_collective::Collective;
use simclr_data::{Batch, Loader};
use simclr_models::checkpoint::{self, CheckpointMeta};
use simclr_models::{ModelConfig, Precision, Stage};

use crate::error::{Result, TrainError};
use crate::optim::OptimizerSettings;
use crate::optim::{all_reduce_gradients, named_vars, Optimizer};
use crate::schedule::LrScheduleConfig;
use crate::tensorboard::{EventWriter, ScalarEvent};

/// What a task's forward pass returns.
pub struct StepOutput {
    /// The scalar loss to minimise.
    pub loss: Tensor,
    /// Metrics to log for this step (name, value); the loss is logged as `loss`.
    pub metrics: Vec<(String, f64)>,
}

/// One stage's part of training.
pub trait TrainTask {
    /// The forward pass on `batch` at global step `step`.
    fn forward(&mut self, batch: &Batch, step: u64) -> Result<StepOutput>;

    /// Called after each optimizer step (momentum-encoder EMA, memory-queue pushes, …).
    fn after_step(&mut self, _step: u64) -> Result<()> {
        Ok(())
    }

    /// Called when an epoch ends; returns metrics for the log (e.g. kNN accuracy).
    fn end_of_epoch(&mut self, _epoch: usize) -> Result<Vec<(String, f64)>> {
        Ok(Vec::new())
    }

    /// The variables written as the model.
    fn varmap(&self) -> &VarMap;

    /// The architecture written in the checkpoint's metadata.
    fn model_config(&self) -> &ModelConfig;

    /// The data-parallel group this task runs in, if it is one of several replicas: the loop
    /// then sums the gradients over the replicas before each optimizer step.
    fn replicas(&self) -> Option<&dyn Collective> {
        None
    }

    /// Extra state saved with the run (memory queue, momentum encoder), by name.
    fn extra_state(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(Vec::new())
    }

    /// Restores [`TrainTask::extra_state`].
    fn load_extra_state(&mut self, _state: &HashMap<String, Tensor>) -> Result<()> {
        Ok(())
    }
}

/// How the loop runs.
#[derive(Clone, Debug)]
pub struct TrainerConfig {
    /// The stage's output folder (checkpoints, metrics).
    pub out_dir: PathBuf,
    /// Written in checkpoints, logs and error messages.
    pub stage: Stage,
    pub total_steps: u64,
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept (at least 1): see [`RunOptions::keep_checkpoint_max`].
    pub keep_checkpoint_max: usize,
    /// See [`RunOptions::allow_changed_settings`].
    pub allow_changed_settings: bool,
    /// Append a metrics row every this many steps.
    pub log_every: u64,
    /// Continue from `out_dir`'s checkpoint when there is one.
    pub resume: bool,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    /// Extra metadata written into checkpoints (e.g. the run's settings as JSON).
    pub extra_meta: Vec<(String, String)>,
}

/// The running checkpoint of a stage, in its output folder (the file later stages read).
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Checkpoints a stage keeps by default: the newest and four older ones, as the official code's
/// `keep_checkpoint_max`.
pub const KEEP_CHECKPOINT_MAX: usize = 5;

/// What every training stage is configured with before its own settings: input size, batch,
/// schedule, optimizer and precision. Each stage's config holds one first, flattened, so the
/// fields keep their names and places in the stage's JSON and TOML (`train_batch_size`,
/// `schedule.learning_rate`, …) and a stage's settings hash is what it was before the block
/// existed.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct StageSettings {
    /// Side of the square network input.
    pub image_size: usize,
    /// Images per step across all replicas.
    pub train_batch_size: usize,
    pub schedule: LrScheduleConfig,
    pub optimizer: OptimizerSettings,
    /// Compute dtype of convolutions and matmuls (`--precision`; f32 master weights).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
}

/// How a stage runs, apart from what it computes; every stage's config holds one, flattened
/// (its fields sit at the stage's level in JSON, so files written before it existed still read).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// Write a checkpoint every this many steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Checkpoints kept in the stage's folder: `checkpoint.safetensors` and older ones as
    /// `checkpoint-<step>.safetensors`, which `--resume` falls back on when the newest does not
    /// verify (the official `keep_checkpoint_max`).
    #[serde(
        default = "keep_checkpoint_max_default",
        skip_serializing_if = "is_keep_checkpoint_max_default"
    )]
    pub keep_checkpoint_max: usize,
    /// Let a resumed run continue with settings that differ from its checkpoint's; the change is
    /// recorded in every later checkpoint (`settings_changed`). Without it such a resume is an
    /// error listing the differences.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_changed_settings: bool,
    /// Data-loading threads (0: the loader's default).
    pub num_workers: usize,
}

fn keep_checkpoint_max_default() -> usize {
    KEEP_CHECKPOINT_MAX
}

fn is_keep_checkpoint_max_default(n: &usize) -> bool {
    *n == KEEP_CHECKPOINT_MAX
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            checkpoint_every: 0,
            keep_checkpoint_max: KEEP_CHECKPOINT_MAX,
            allow_changed_settings: false,
            num_workers: 0,
        }
    }
}

/// Settings that change how a run is carried out but not what it computes: a resume may change
/// them freely. (`knn*` only evaluates; the rest are [`RunOptions`].)
const NOT_SETTINGS: [&str; 6] = [
    "checkpoint_every",
    "keep_checkpoint_max",
    "allow_changed_settings",
    "num_workers",
    "knn_every_epochs",
    "knn",
];

/// Metadata key of the record of settings changed by resumed runs.
const SETTINGS_CHANGED: &str = "settings_changed";

/// What a finished run reports.
#[derive(Clone, Debug, Default)]
pub struct TrainSummary {
    pub steps: u64,
    /// Step the run started from (0, or the resumed step).
    pub start_step: u64,
    pub final_loss: f64,
    /// Per-step losses of this invocation, in order.
    pub losses: Vec<f64>,
    /// Training time of the whole run, earlier invocations included (from the checkpoint).
    pub wall_seconds: f64,
    /// Images per second over the whole run.
    pub images_per_second: f64,
    /// Metrics of the last epoch end, if any.
    pub last_epoch_metrics: Vec<(String, f64)>,
    pub checkpoint: PathBuf,
}

// Both live under `simclr_models::checkpoint::STATE_PREFIX`, which model loaders skip.
const OPTIM_PREFIX: &str = "train_state/optimizer/";
const TASK_PREFIX: &str = "train_state/task/";

impl TrainerConfig {
    /// The running checkpoint: model + training state, rewritten atomically.
    pub fn checkpoint_path(&self) -> PathBuf {
        self.out_dir.join(CHECKPOINT_FILE)
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.out_dir.join("metrics.jsonl")
    }
    /// An older checkpoint kept for `--resume` to fall back on.
    pub fn history_path(&self, step: u64) -> PathBuf {
        self.out_dir.join(format!("checkpoint-{step}.safetensors"))
    }
    /// The older checkpoints in the folder, newest (highest step) first.
    pub fn history(&self) -> Vec<(u64, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.out_dir) else {
            return Vec::new();
        };
        let mut found: Vec<(u64, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let step = name
                    .to_str()?
                    .strip_prefix("checkpoint-")?
                    .strip_suffix(".safetensors")?
                    .parse()
                    .ok()?;
                Some((step, e.path()))
            })
            .collect();
        found.sort_by_key(|e| std::cmp::Reverse(e.0));
        found
    }
}

/// A checkpoint read for a resume: its file, metadata and tensors.
type Loaded = (PathBuf, CheckpointMeta, HashMap<String, Tensor>);

/// The checkpoints of the run so far.
struct Saved {
    /// The newest healthy checkpoint (named by the errors that stop a run).
    newest: Option<PathBuf>,
    /// The step held by `checkpoint.safetensors` when it is healthy (kept as history when the
    /// next checkpoint replaces it).
    on_disk: Option<u64>,
}

/// Before a new checkpoint replaces `checkpoint.safetensors` (holding step `previous`, known to
/// be healthy), keeps it as `checkpoint-<previous>.safetensors`: a hard link, so nothing is
/// copied (a copy where links are not supported).
fn keep_previous(cfg: &TrainerConfig, previous: Option<u64>) -> Result<()> {
    let Some(previous) = previous.filter(|_| cfg.keep_checkpoint_max > 1) else {
        return Ok(());
    };
    let (from, to) = (cfg.checkpoint_path(), cfg.history_path(previous));
    if to.exists() || !from.is_file() {
        return Ok(());
    }
    std::fs::hard_link(&from, &to)
        .or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
        .map_err(|source| TrainError::Io { path: to, source })
}

/// Removes the older checkpoints beyond `keep_checkpoint_max − 1` (the newest is the running one).
fn prune_history(cfg: &TrainerConfig) {
    for (_, path) in cfg
        .history()
        .into_iter()
        .skip(cfg.keep_checkpoint_max.saturating_sub(1))
    {
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(
                "could not remove the old checkpoint {}: {e}",
                path.display()
            );
        }
    }
}

/// The settings in `now` that differ from `before` (both stage configs as JSON), as
/// `path: old -> new`, leaving out [`NOT_SETTINGS`].
fn changed_settings(before: &str, now: &str) -> Vec<String> {
    fn flatten(prefix: &str, v: &Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if NOT_SETTINGS.contains(&k.as_str()) {
                        continue;
                    }
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&path, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let parse = |s: &str| serde_json::from_str::<Value>(s).unwrap_or(Value::String(s.into()));
    let (mut a, mut b) = Default::default();
    flatten("", &parse(before), &mut a);
    flatten("", &parse(now), &mut b);
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let absent = "(absent)".to_string();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (a.get(k).unwrap_or(&absent), b.get(k).unwrap_or(&absent));
            (x != y).then(|| format!("{k}: {x} -> {y}"))
        })
        .collect()
}

fn save_checkpoint(
    cfg: &TrainerConfig,
    task: &dyn TrainTask,
    optimizer: &dyn Optimizer,
    step: u64,
    done: bool,
    totals: (f64, u64),
    saved: &Saved,
) -> Result<PathBuf> {
    let mut state: Vec<(String, Tensor)> = optimizer
        .state_tensors()
        .into_iter()
        .map(|(k, t)| (format!("{OPTIM_PREFIX}{k}"), t))
        .collect();
    state.extend(
        task.extra_state()?
            .into_iter()
            .map(|(k, t)| (format!("{TASK_PREFIX}{k}"), t)),
    );
    // Only healthy state is saved: a checkpoint with an infinite BN variance would be named
    // "the last good one" by the next failure. Every replica checks (their state is the same),
    // so they all stop together.
    let variables: Vec<(String, Tensor)> = {
        let data = task
            .varmap()
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let all = variables.iter().chain(&state).map(|(k, t)| (k.as_str(), t));
    if let Some(tensor) = checkpoint::first_non_finite(all)? {
        return Err(TrainError::NonFiniteState {
            stage: cfg.stage.to_string(),
            step,
            tensor,
            last_checkpoint: saved.newest.clone(),
        });
    }
    // With several replicas, rank 0 writes for all of them: their trainable variables are
    // identical (and with global BN their statistics too). Every rank reads it on resume, so
    // the output folder must be shared.
    if task.replicas().is_some_and(|r| r.rank() != 0) {
        return Ok(cfg.checkpoint_path());
    }
    let mut meta = CheckpointMeta::new(task.model_config().clone(), cfg.stage, step)
        .with_extra("complete", if done { "true" } else { "false" })
        .with_extra("total_steps", cfg.total_steps.to_string())
        // Training time and images over every invocation, so a resumed run reports the whole.
        .with_extra("train_seconds", format!("{:.3}", totals.0))
        .with_extra("train_images", totals.1.to_string());
    for (k, v) in &cfg.extra_meta {
        meta = meta.with_extra(k.clone(), v.clone());
    }
    let path = cfg.checkpoint_path();
    keep_previous(cfg, saved.on_disk.filter(|&p| p != step))?;
    checkpoint::save_with_state(&path, task.varmap(), &meta, &state)?;
    prune_history(cfg);
    Ok(path)
}

/// The newest checkpoint of the run in `cfg.out_dir` that loads and verifies:
/// `checkpoint.safetensors`, else the older ones newest first (each failure is logged, and
/// the first one is returned when none loads). `None` when the folder holds no checkpoint.
fn load_for_resume(cfg: &TrainerConfig, device: &candle_core::Device) -> Result<Option<Loaded>> {
    let newest = cfg.checkpoint_path();
    let candidates: Vec<PathBuf> = newest
        .is_file()
        .then(|| newest.clone())
        .into_iter()
        .chain(cfg.history().into_iter().map(|(_, p)| p))
        .collect();
    let mut first_error = None;
    for path in candidates {
        match checkpoint::load_tensors(&path, device) {
            Ok((meta, tensors)) => {
                if path != newest {
                    tracing::warn!(
                        "resuming from the older checkpoint {} (step {}): {}",
                        path.display(),
                        meta.step,
                        match &first_error {
                            Some(e) => format!("the newest did not load: {e}"),
                            None => format!("{} is missing", newest.display()),
                        }
                    );
                }
                return Ok(Some((path, meta, tensors)));
            }
            Err(e) => {
                tracing::warn!("{e}");
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(None),
    }
}

/// Restores the model, optimizer and task state of the run in `cfg.out_dir` (see
/// [`load_for_resume`]); returns the checkpoint it used, its step, the training seconds and
/// images so far, and the settings-change record to carry on. `None`: nothing to resume.
#[allow(clippy::type_complexity)]
fn restore(
    cfg: &TrainerConfig,
    task: &mut dyn TrainTask,
    optimizer: &mut dyn Optimizer,
) -> Result<Option<(PathBuf, u64, (f64, u64), Option<String>)>> {
    let device = {
        let data = task
            .varmap()
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        data.values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(candle_core::Device::Cpu)
    };
    let Some((path, meta, tensors)) = load_for_resume(cfg, &device)? else {
        return Ok(None);
    };
    let path = path.as_path();
    if &meta.config != task.model_config() {
        return Err(TrainError::InvalidConfig(format!(
            "{}: written for another architecture ({:?}); use a fresh output folder or the same settings",
            path.display(),
            meta.config
        )));
    }
    // The run continues only with the settings it was started with, unless told otherwise:
    // the checkpoint's record of them would be false.
    let mut record = meta.extra.get(SETTINGS_CHANGED).cloned();
    let mut changes = Vec::new();
    for (key, now) in &cfg.extra_meta {
        if let Some(before) = meta.extra.get(key) {
            changes.extend(changed_settings(before, now));
        }
    }
    if !changes.is_empty() {
        if !cfg.allow_changed_settings {
            return Err(TrainError::ChangedSettings {
                checkpoint: path.to_path_buf(),
                changes: changes.join("; "),
            });
        }
        tracing::warn!(
            "resuming {} with changed settings: {}",
            path.display(),
            changes.join("; ")
        );
        let entry = format!("at step {}: {}", meta.step, changes.join("; "));
        record = Some(match record {
            Some(r) => format!("{r} | {entry}"),
            None => entry,
        });
    }
    checkpoint::assign_variables(task.varmap(), &tensors, |_| false)?;
    let strip = |prefix: &str| -> HashMap<String, Tensor> {
        tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|s| (s.to_string(), t.clone())))
            .collect()
    };
    optimizer.load_state_tensors(&strip(OPTIM_PREFIX))?;
    task.load_extra_state(&strip(TASK_PREFIX))?;
    let seconds = meta
        .extra
        .get("train_seconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let images = meta
        .extra
        .get("train_images")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Some((
        path.to_path_buf(),
        meta.step,
        (seconds, images),
        record,
    )))
}

/// A loss this many times its running median (or 1, whichever is larger) means the run has
/// diverged: the losses of every stage here are cross-entropies of order 1–10, so the bound
/// (1000 at least) is far above any noisy batch and far below a run whose weights blow up
/// (such a run's loss grows by orders of magnitude within steps while staying finite).
pub const DIVERGENCE_FACTOR: f64 = 1000.0;

/// The last losses of the run, for the divergence bound.
#[derive(Default)]
struct RecentLosses {
    window: std::collections::VecDeque<f64>,
}

impl RecentLosses {
    /// Losses kept; the median needs at least [`RecentLosses::MIN`] of them.
    const LEN: usize = 100;
    const MIN: usize = 5;

    fn push(&mut self, loss: f64) {
        if self.window.len() == Self::LEN {
            self.window.pop_front();
        }
        self.window.push_back(loss);
    }

    fn median(&self) -> Option<f64> {
        if self.window.len() < Self::MIN {
            return None;
        }
        let mut v: Vec<f64> = self.window.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    }
}

/// An exclusive lock on a stage's output folder, held for the whole run: a second run writing
/// into the same folder would interleave its checkpoints and metrics with the first's.
struct RunLock {
    _file: std::fs::File,
}

impl RunLock {
    const FILE: &'static str = ".lock";

    fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(Self::FILE);
        let io = |e| TrainError::Io {
            path: path.clone(),
            source: e,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(TrainError::Locked {
                    dir: dir.to_path_buf(),
                    holder: holder.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // The holder's PID, for the message a second run prints.
        file.set_len(0).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        Ok(RunLock { _file: file })
    }
}

/// Removes the temporary files that killed runs left behind while writing a checkpoint
/// (`.checkpoint.safetensors.XXXX.tmp`). Called with the folder's lock held, so none of them
/// belongs to a live writer.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if simclr_fs::is_temporary_of(&name, CHECKPOINT_FILE)
            && std::fs::remove_file(entry.path()).is_ok()
        {
            tracing::info!(
                "removed {}, left by an interrupted run",
                entry.path().display()
            );
        }
    }
}

/// Appends rows to the JSONL metrics file, and their numbers to a TensorBoard event file beside
/// it; on resume, drops rows past the resumed step so the file reads as one uninterrupted run
/// (and rewrites the event file from the rows kept).
struct MetricsLog {
    file: std::fs::File,
    events: Option<EventWriter>,
}

/// The numbers of a metrics row as TensorBoard scalars (tag = field name), at its step; `step`
/// and the epoch counters are the axis, not scalars.
fn row_event(fields: &Map<String, Value>) -> Option<ScalarEvent> {
    let step = fields.get("step")?.as_i64()?;
    let values = fields
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "epoch_end"))
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()? as f32)))
        .collect();
    Some(ScalarEvent {
        step,
        wall_time: unix_now(),
        values,
    })
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl MetricsLog {
    fn open(path: &Path, keep_until: Option<u64>) -> Result<Self> {
        let io = |e| TrainError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        // The rows kept (on resume), which the event file is rebuilt from.
        let mut kept = String::new();
        if let Some(step) = keep_until {
            if let Ok(text) = std::fs::read_to_string(path) {
                kept = text
                    .lines()
                    .filter(|l| {
                        serde_json::from_str::<Value>(l)
                            .ok()
                            .and_then(|v| v.get("step").and_then(Value::as_u64))
                            .is_some_and(|s| s <= step)
                    })
                    .map(|l| format!("{l}\n"))
                    .collect();
                simclr_data::write_atomic(path, kept.as_bytes())
                    .map_err(|e| TrainError::InvalidConfig(e.to_string()))?;
            }
        } else {
            let _ = std::fs::remove_file(path);
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        // TensorBoard is a convenience too: without it the run goes on (with a warning).
        let dir = path.parent().unwrap_or(Path::new("."));
        let events = EventWriter::create(dir, unix_now()).and_then(|mut w| {
            for line in kept.lines() {
                if let Ok(Value::Object(fields)) = serde_json::from_str::<Value>(line) {
                    if let Some(e) = row_event(&fields) {
                        w.scalars(&e)?;
                    }
                }
            }
            Ok(w)
        });
        let events = events
            .inspect_err(|e| tracing::warn!(dir = %dir.display(), "no TensorBoard event file: {e}"))
            .ok();
        Ok(MetricsLog { file, events })
    }

    fn row(&mut self, fields: Map<String, Value>) {
        if let (Some(w), Some(e)) = (&mut self.events, row_event(&fields)) {
            if w.scalars(&e).is_err() {
                self.events = None;
            }
        }
        // Metrics are a convenience: a full disk must not kill the run.
        let _ = writeln!(self.file, "{}", Value::Object(fields));
    }
}

fn progress_bar(cfg: &TrainerConfig, start: u64) -> ProgressBar {
    let pb = ProgressBar::new(cfg.total_steps);
    if !cfg.progress {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} step  {msg}  ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(cfg.stage.as_str());
    pb.set_position(start);
    pb
}

/// Runs `task` from step 0 (or the checkpoint in `cfg.out_dir` when resuming) to
/// `cfg.total_steps`, with `lr(step)` as the learning rate.
pub fn train(
    task: &mut dyn TrainTask,
    loader: &Loader,
    optimizer: &mut dyn Optimizer,
    lr: &dyn Fn(u64) -> f64,
    cfg: &TrainerConfig,
) -> Result<TrainSummary> {
    std::fs::create_dir_all(&cfg.out_dir).map_err(|e| TrainError::Io {
        path: cfg.out_dir.clone(),
        source: e,
    })?;
    let primary = task.replicas().is_none_or(|r| r.rank() == 0);
    // Held until this function returns; the kernel drops it when the process dies, so a
    // killed run never blocks its own resume.
    let _lock = if primary {
        Some(RunLock::acquire(&cfg.out_dir)?)
    } else {
        None
    };
    if primary {
        remove_stale_temporaries(&cfg.out_dir);
    }
    let ckpt = cfg.checkpoint_path();
    if !cfg.resume {
        // Starting over would delete its metrics at once and its checkpoint at the first save.
        if let Some(existing) = ckpt
            .is_file()
            .then(|| ckpt.clone())
            .or_else(|| cfg.history().first().map(|(_, p)| p.clone()))
        {
            return Err(TrainError::ExistingRun {
                dir: cfg.out_dir.clone(),
                checkpoint: existing,
            });
        }
    }
    let mut cfg = cfg.clone();
    let cfg = &mut cfg;
    // `previous`: the step of a healthy `checkpoint.safetensors` on disk, kept as history when
    // the next checkpoint replaces it.
    let (start, before, previous, resumed_from) = match cfg.resume {
        true => match restore(cfg, task, optimizer)? {
            Some((path, s, before, record)) => {
                tracing::info!(stage = %cfg.stage, step = s, "resuming from {}", path.display());
                if let Some(record) = record {
                    cfg.extra_meta.retain(|(k, _)| k != SETTINGS_CHANGED);
                    cfg.extra_meta.push((SETTINGS_CHANGED.into(), record));
                }
                let previous = (path == ckpt).then_some(s);
                (s, before, previous, Some(path))
            }
            None => (0, (0.0, 0), None, None),
        },
        false => (0, (0.0, 0), None, None),
    };
    let cfg = &*cfg;
    let totals = |t0: &Instant, images: usize| {
        (
            before.0 + t0.elapsed().as_secs_f64(),
            before.1 + images as u64,
        )
    };
    let mut log = if primary {
        Some(MetricsLog::open(
            &cfg.metrics_path(),
            (start > 0).then_some(start),
        )?)
    } else {
        None
    };
    let per_epoch = loader.batches_per_epoch() as u64;
    let pb = progress_bar(cfg, start);
    let t0 = Instant::now();
    let mut summary = TrainSummary {
        start_step: start,
        steps: start,
        ..Default::default()
    };
    let mut images = 0usize;
    let mut step = start;
    let mut saved = Saved {
        newest: resumed_from,
        on_disk: previous,
    };
    let mut recent = RecentLosses::default();
    let trainable = named_vars(task.varmap());
    while step < cfg.total_steps {
        let epoch = (step / per_epoch) as usize;
        let first = (step % per_epoch) as usize;
        for batch in loader.epoch(epoch, first) {
            if step >= cfg.total_steps {
                break;
            }
            let batch = batch.map_err(TrainError::Data)?;
            let ts = Instant::now();
            let rate = lr(step);
            let out = task.forward(&batch, step)?;
            let loss = out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            let median = recent.median();
            let diverged = median.is_some_and(|m| loss > DIVERGENCE_FACTOR * m.max(1.0));
            // With several replicas, every one must stop together: one that left alone would
            // leave the others waiting in their next collective.
            let healthy = match task.replicas().filter(|r| r.world_size() > 1) {
                Some(r) => {
                    let bad = f32::from(!loss.is_finite() || diverged);
                    let bad = Tensor::new(&[bad], out.loss.device())?;
                    r.all_reduce_sum(&bad)?.to_vec1::<f32>()?[0] == 0.0
                }
                None => loss.is_finite() && !diverged,
            };
            if !healthy {
                return Err(match median.filter(|_| loss.is_finite()) {
                    Some(median) => TrainError::Diverged {
                        stage: cfg.stage.to_string(),
                        step,
                        value: loss,
                        median,
                        last_checkpoint: saved.newest.clone(),
                    },
                    None => TrainError::NonFiniteLoss {
                        stage: cfg.stage.to_string(),
                        step,
                        epoch,
                        batch: batch.index,
                        value: loss,
                        last_checkpoint: saved.newest.clone(),
                    },
                });
            }
            recent.push(loss);
            let mut grads = out.loss.backward()?;
            if let Some(replicas) = task.replicas() {
                all_reduce_gradients(&mut grads, &trainable, replicas)?;
            }
            let stats = optimizer.step(&grads, rate)?;
            drop(grads);
            task.after_step(step)?;
            step += 1;
            checkpoint::crash_point(|| format!("{}:step:{step}", cfg.stage));
            let n = batch.indices.len();
            images += n;
            summary.losses.push(loss);
            let ips = n as f64 / ts.elapsed().as_secs_f64();
            let acc = out
                .metrics
                .iter()
                .find(|(k, _)| k.ends_with("acc"))
                .map(|(_, v)| *v);
            pb.set_message(format!(
                "loss {loss:.4}{}  lr {rate:.4}  {ips:.0} img/s",
                acc.map(|a| format!("  acc {a:.3}")).unwrap_or_default()
            ));
            pb.set_position(step);
            if cfg.log_every > 0 && (step % cfg.log_every == 0 || step == cfg.total_steps) {
                let mut row = Map::new();
                row.insert("step".into(), json!(step));
                row.insert("epoch".into(), json!(epoch));
                row.insert("lr".into(), json!(rate));
                row.insert("loss".into(), json!(loss));
                for (k, v) in &out.metrics {
                    row.insert(k.clone(), json!(v));
                }
                row.insert(
                    "weight_decay".into(),
                    json!(stats.weight_decay_loss_value()?),
                );
                row.insert("images_per_second".into(), json!(ips));
                if let Some(log) = &mut log {
                    log.row(row);
                }
            }
            if cfg.checkpoint_every > 0
                && step % cfg.checkpoint_every == 0
                && step < cfg.total_steps
            {
                saved.newest = Some(save_checkpoint(
                    cfg,
                    task,
                    optimizer,
                    step,
                    false,
                    totals(&t0, images),
                    &saved,
                )?);
                saved.on_disk = Some(step);
            }
        }
        if step % per_epoch == 0 && step > start {
            let metrics = task.end_of_epoch(epoch)?;
            if !metrics.is_empty() {
                let mut row = Map::new();
                row.insert("step".into(), json!(step));
                row.insert("epoch_end".into(), json!(epoch));
                let mut shown = Vec::new();
                for (k, v) in &metrics {
                    row.insert(k.clone(), json!(v));
                    shown.push(format!("{k} {v:.4}"));
                }
                if let Some(log) = &mut log {
                    log.row(row);
                }
                pb.println(format!("{} epoch {epoch}: {}", cfg.stage, shown.join(", ")));
                summary.last_epoch_metrics = metrics;
            }
        }
    }
    pb.finish_and_clear();
    let (seconds, all_images) = totals(&t0, images);
    summary.checkpoint = save_checkpoint(
        cfg,
        task,
        optimizer,
        step,
        true,
        (seconds, all_images),
        &saved,
    )?;
    summary.steps = step;
    summary.final_loss = summary.losses.last().copied().unwrap_or(f64::NAN);
    summary.wall_seconds = seconds;
    summary.images_per_second = all_images as f64 / seconds.max(1e-9);
    Ok(summary)
}

/// Where and how a stage runs, apart from its settings: the argument every stage's entry point
/// (`run_pretrain`, `run_finetune`, `run_distill`) takes.
#[derive(Clone, Copy)]
pub struct StageEnv<'a> {
    /// The stage's output folder (checkpoints, metrics, its lock).
    pub out_dir: &'a Path,
    /// Continue the run in `out_dir` ([`TrainerConfig::resume`]).
    pub resume: bool,
    /// Draw a progress bar on a terminal.
    pub progress: bool,
    pub device: &'a candle_core::Device,
}

/// What a stage adds to [`train`]: its name, folder and options.
pub struct StageRun<'a> {
    pub stage: Stage,
    /// Its folder, resume policy and progress bar (the device is the task's business).
    pub env: StageEnv<'a>,
    pub options: &'a RunOptions,
    /// The stage's settings, written into its checkpoints.
    pub extra_meta: Vec<(String, String)>,
}

/// The fraction of rows of `logits` (`[N, classes]`) whose largest entry is at `labels` (`[N]`
/// class indices): the training accuracy every stage logs.
pub fn batch_accuracy(logits: &candle_core::Tensor, labels: &candle_core::Tensor) -> Result<f64> {
    Ok(logits
        .argmax(candle_core::D::Minus1)?
        .eq(labels)?
        .to_dtype(candle_core::DType::F64)?
        .mean_all()?
        .to_scalar::<f64>()?)
}

/// The metadata a stage writes into its checkpoints: its settings as JSON under `key`
/// (`pretrain_config`, …; what a resume compares) and, for a stage that trains a supervised
/// head, the class names in label order (what `simclr eval` compares with its data).
pub fn stage_meta(
    key: &str,
    settings: &impl serde::Serialize,
    class_names: Option<&[String]>,
) -> Result<Vec<(String, String)>> {
    let err = |e: serde_json::Error| TrainError::InvalidConfig(format!("{key}: {e}"));
    let mut meta = vec![(
        key.to_string(),
        serde_json::to_string(settings).map_err(err)?,
    )];
    if let Some(names) = class_names {
        let names = serde_json::to_string(names).map_err(err)?;
        meta.push((checkpoint::CLASS_NAMES.to_string(), names));
    }
    Ok(meta)
}

/// The common tail of every stage: the schedule for the loader's images and batch, the
/// optimizer over the task's variables, and [`train`].
pub fn run_stage(
    task: &mut dyn TrainTask,
    loader: &Loader,
    settings: &StageSettings,
    run: StageRun,
) -> Result<TrainSummary> {
    let batch = loader.config().batch_size as u64;
    let schedule = settings.schedule.build(loader.num_images() as u64, batch)?;
    let mut optimizer = crate::optim::build_optimizer(
        crate::optim::named_vars(task.varmap()),
        &settings.optimizer,
    )?;
    let cfg = TrainerConfig {
        out_dir: run.env.out_dir.to_path_buf(),
        stage: run.stage,
        total_steps: schedule.total_steps,
        checkpoint_every: run.options.checkpoint_every,
        keep_checkpoint_max: run.options.keep_checkpoint_max.max(1),
        allow_changed_settings: run.options.allow_changed_settings,
        log_every: 1,
        resume: run.env.resume,
        progress: run.env.progress,
        extra_meta: run.extra_meta,
    };
    train(task, loader, optimizer.as_mut(), &|s| schedule.lr(s), &cfg)
}
