//! The error type of this crate.

use candle_core::DType;

/// Everything that can go wrong in the training machinery.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The optimizers keep their arithmetic and state in f32.
    #[error("variable `{name}` has dtype {dtype:?}; the optimizers require f32")]
    UnsupportedDType { name: String, dtype: DType },

    /// Two variables handed to one optimizer share a name.
    #[error("variable `{0}` appears twice in the optimizer's list")]
    DuplicateVar(String),

    /// A checkpoint lacks a state tensor the optimizer needs.
    #[error("optimizer state `{key}` is missing from the checkpoint")]
    MissingState { key: String },

    /// A checkpointed state tensor does not have the shape of its variable.
    #[error("optimizer state `{key}` has shape {found:?}, expected {expected:?}")]
    StateShape {
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] simclr_models::CheckpointError),

    /// A file of the run could not be written or read.
    #[error("{}: {source}", .path.display())]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },

    /// The data pipeline failed (the error names the file).
    #[error("data: {0}")]
    Data(#[from] simclr_data::DataError),

    /// The loss became NaN or infinite: the run stops, the last checkpoint stays as it was.
    #[error(
        "{stage}: the loss is {value} at step {step} (epoch {epoch}, batch {batch}); stopping. {}",
        last_good(.last_checkpoint)
    )]
    NonFiniteLoss {
        stage: String,
        step: u64,
        epoch: usize,
        batch: usize,
        value: f64,
        last_checkpoint: Option<std::path::PathBuf>,
    },

    /// The loss ran away while finite (weights growing without bound): the run stops.
    #[error(
        "{stage}: the loss is {value:.4e} at step {step}, more than {} times its running median \
         {median:.4}: the run has diverged; stopping. {}",
        crate::trainer::DIVERGENCE_FACTOR,
        last_good(.last_checkpoint)
    )]
    Diverged {
        stage: String,
        step: u64,
        value: f64,
        median: f64,
        last_checkpoint: Option<std::path::PathBuf>,
    },

    /// A weight, BN statistic or optimizer slot became NaN or infinite; it was not saved.
    #[error(
        "{stage}: `{tensor}` holds NaN or infinite values at step {step}; stopping without saving \
         it. {}",
        last_good(.last_checkpoint)
    )]
    NonFiniteState {
        stage: String,
        step: u64,
        tensor: String,
        last_checkpoint: Option<std::path::PathBuf>,
    },

    /// Another run holds the output folder.
    #[error(
        "{}: another run is writing into this folder (process {}); wait for it to finish or \
         choose another output folder",
        .dir.display(),
        if .holder.is_empty() { "unknown" } else { .holder.as_str() }
    )]
    Locked {
        dir: std::path::PathBuf,
        holder: String,
    },

    /// `--resume` with settings that differ from the ones the checkpoint was trained with.
    #[error("{}: written with other settings ({changes}); resume with the same settings, start a fresh output folder, or pass --allow-changed-settings to continue and record the change", .checkpoint.display())]
    ChangedSettings {
        checkpoint: std::path::PathBuf,
        changes: String,
    },

    /// A hyperparameter or schedule argument is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// The network could not be built (an invalid architecture).
    #[error(transparent)]
    Model(#[from] simclr_models::ModelError),

    /// An evaluation inside a stage (the kNN monitor, the teacher's labelling pass) failed.
    #[error(transparent)]
    Eval(#[from] simclr_eval::EvalError),

    /// A checkpoint written by a stage that cannot start this one.
    #[error(
        "{}: a checkpoint of stage {found:?} cannot start {stage}; it needs one of {}",
        .path.display(),
        stage_list(.expected)
    )]
    WrongStage {
        path: std::path::PathBuf,
        /// The stage the checkpoint records.
        found: String,
        /// The stage being started.
        stage: simclr_models::Stage,
        /// The stages it can start from.
        expected: &'static [simclr_models::Stage],
    },

    /// A model without a supervised head where the stage needs its logits.
    #[error("{what} has no supervised head")]
    NoSupervisedHead { what: String },

    /// A teacher that predicts another number of classes than the data has.
    #[error("{}: the teacher predicts {found:?} classes, the dataset has {expected}", .path.display())]
    ClassCount {
        path: std::path::PathBuf,
        found: Option<usize>,
        expected: usize,
    },

    /// A global batch that does not split evenly over the replicas.
    #[error("the global batch of {batch} does not split evenly over {replicas} replicas")]
    UnevenBatch { batch: usize, replicas: usize },

    /// A fresh run was started in a folder that holds another run's checkpoint.
    #[error(
        "{}: the folder already holds a run ({}); pass --resume to continue it, or choose \
         another output folder (or delete this one) to start again",
        .dir.display(),
        .checkpoint.display()
    )]
    ExistingRun {
        dir: std::path::PathBuf,
        checkpoint: std::path::PathBuf,
    },
}

/// `pretrain, import`.
fn stage_list(stages: &[simclr_models::Stage]) -> String {
    let names: Vec<&str> = stages.iter().map(|s| s.as_str()).collect();
    names.join(", ")
}

/// The advice that ends a stopped run's message.
fn last_good(last_checkpoint: &Option<std::path::PathBuf>) -> String {
    match last_checkpoint {
        Some(p) => format!(
            "The last good checkpoint is {}; lower the learning rate and resume from it.",
            p.display()
        ),
        None => "No checkpoint was written yet.".to_string(),
    }
}

/// `Result` with [`TrainError`].
pub type Result<T> = std::result::Result<T, TrainError>;
