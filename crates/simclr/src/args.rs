//! Flags shared by the subcommands, named after the official code's flags.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::builder::TypedValueParser;
use clap::Args;
use simclr_data::{load_dataset, DataOptions, Dataset, DatasetName, Split};
use simclr_models::{ModelConfig, Precision, ProjHeadMode};
use simclr_train::optim::OptimizerKind;
use simclr_train::schedule::LearningRateScaling;
use simclr_train::StageSettings;

#[derive(Args, Clone, Debug)]
pub struct DataArgs {
    /// fashion-mnist-subset (default), fashion-mnist, mnist, cifar10, cifar100, imagefolder, `hf:<owner>/<name>`
    #[arg(long, default_value = "fashion-mnist-subset")]
    pub dataset: String,
    /// The dataset's folder (else $SIMCLR_DATA_DIR, else the dataset's usual place).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Network input side; defaults to 28 for (Fashion-)MNIST, 32 for CIFAR, 224 otherwise.
    #[arg(long)]
    pub image_size: Option<usize>,
    #[command(flatten)]
    pub source: DataSourceArgs,
    /// Decoding/augmentation threads (0: one per core; at most 256).
    #[arg(long, default_value_t = 0, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=256))]
    pub num_workers: usize,
}

/// Which splits and columns of a dataset a run reads, and how much of a Hub dataset it keeps in
/// memory: flags of every command, and part of a pipeline's settings (they change what it
/// trains on, or in which order).
#[derive(Args, Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSourceArgs {
    /// The training split: an imagefolder's folder or a Hub dataset's split. [default: train]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_split: Option<String>,
    /// The evaluation split: an imagefolder's folder (a flat folder of images takes its labels
    /// from LOC_val_solution.csv or val_labels.txt) or a Hub dataset's split (`validation` for
    /// ImageNet). [default: val for imagefolder, test for Hub datasets]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<String>,
    /// hf: datasets: a branch, tag or commit of the dataset repository. [default: main, then
    /// the Hub's parquet conversion]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_revision: Option<String>,
    /// hf: datasets: the column of encoded images. [default: image or img, or any column with
    /// a bytes field]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_image_column: Option<String>,
    /// hf: datasets: the integer label column. [default: a column named *label*, else the
    /// first integer column]
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_label_column: Option<String>,
    /// hf: datasets: the most MiB of encoded images kept in memory; row groups are read when
    /// needed and dropped beyond this. [default: 1024]
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 30))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_cache_mib: Option<usize>,
}

impl DataSourceArgs {
    /// Nothing set: the datasets' defaults.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The reader options for data in `data_dir`.
    pub fn options(&self, data_dir: Option<PathBuf>) -> DataOptions {
        DataOptions {
            data_dir,
            train_split: self.train_split.clone(),
            eval_split: self.eval_split.clone(),
            hub: simclr_data::hub::HubOptions {
                revision: self.hf_revision.clone(),
                image_column: self.hf_image_column.clone(),
                label_column: self.hf_label_column.clone(),
                max_cache_bytes: self.hf_cache_mib.map(|m| m << 20),
                ..Default::default()
            },
        }
    }
}

impl DataArgs {
    pub fn name(&self) -> Result<DatasetName> {
        Ok(self.dataset.parse()?)
    }

    pub fn load(&self, split: Split) -> Result<Arc<dyn Dataset>> {
        let opts = self.source.options(self.data_dir.clone());
        let name = self.name()?;
        load_dataset(&name, split, &opts).with_context(|| format!("loading {name} ({split:?})"))
    }

    pub fn image_size(&self) -> Result<usize> {
        Ok(self.image_size.unwrap_or(self.name()?.default_image_size()))
    }
}

/// How a stage runs: resuming, checkpoints, progress (the same flags on every stage).
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Continue the run in the output folder (from the newest checkpoint that verifies).
    #[arg(long)]
    pub resume: bool,
    /// With --resume: continue even if settings differ from the checkpoint's, and record the
    /// change in its metadata (`settings_changed`).
    #[arg(long)]
    pub allow_changed_settings: bool,
    /// Write a checkpoint every this many steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub checkpoint_every: u64,
    /// Checkpoints kept in the output folder: the newest and older ones to fall back on
    /// (`checkpoint-<step>.safetensors`).
    #[arg(long, default_value_t = simclr_train::KEEP_CHECKPOINT_MAX, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub keep_checkpoint_max: usize,
    #[arg(long)]
    pub no_progress: bool,
}

impl RunArgs {
    /// The stage's [`simclr_train::RunOptions`] from these flags.
    pub fn options(&self, num_workers: usize) -> simclr_train::RunOptions {
        simclr_train::RunOptions {
            checkpoint_every: self.checkpoint_every,
            keep_checkpoint_max: self.keep_checkpoint_max,
            allow_changed_settings: self.allow_changed_settings,
            num_workers,
        }
    }
}

/// The architecture flags. Unset ones take [`ModelConfig::default`]'s values (ResNet-50 1×, no
/// SK, base width 64, a 3-layer projection head of 128 outputs); where the architecture comes
/// from a checkpoint, setting any of them is an error rather than a flag silently ignored.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// [default: 50]
    #[arg(long)]
    pub resnet_depth: Option<usize>,
    /// [default: 1]
    #[arg(long)]
    pub width_multiplier: Option<usize>,
    /// Selective kernels (0.0625 for the released SK1 models); also switches on the ResNet-D
    /// stem and shortcut. [default: 0]
    #[arg(long)]
    pub sk_ratio: Option<f64>,
    /// First-stage width before the multiplier (64 in every official model). [default: 64]
    #[arg(long)]
    pub base_width: Option<usize>,
    /// [default: 3]
    #[arg(long)]
    pub num_proj_layers: Option<usize>,
    /// [default: 128]
    #[arg(long)]
    pub proj_out_dim: Option<usize>,
    /// The projection-head layer the fine-tuned or evaluated network ends at (0: the encoder
    /// output; negative counts from the end). Default: 1 when fine-tuning a pretrained
    /// checkpoint (SimCLRv2), else 0 (linear evaluation, the supervised baseline).
    #[arg(long, allow_negative_numbers = true)]
    pub ft_proj_selector: Option<i32>,
    /// none, linear or nonlinear (the official `proj_head_mode`). [default: nonlinear]
    #[arg(long, value_parser = parse_proj_head_mode)]
    pub proj_head_mode: Option<ProjHeadMode>,
    /// BN moving-average decay (Keras momentum). [default: 0.9]
    #[arg(long)]
    pub batch_norm_decay: Option<f64>,
}

fn parse_proj_head_mode(s: &str) -> std::result::Result<ProjHeadMode, String> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| format!("{s:?}: expected none, linear or nonlinear"))
}

impl ModelArgs {
    pub fn config(&self, image_size: usize, num_classes: Option<usize>) -> Result<ModelConfig> {
        let d = ModelConfig::default();
        let c = ModelConfig {
            resnet_depth: self.resnet_depth.unwrap_or(d.resnet_depth),
            width_multiplier: self.width_multiplier.unwrap_or(d.width_multiplier),
            sk_ratio: self.sk_ratio.unwrap_or(d.sk_ratio),
            base_width: self.base_width.unwrap_or(d.base_width),
            num_proj_layers: self.num_proj_layers.unwrap_or(d.num_proj_layers),
            proj_out_dim: self.proj_out_dim.unwrap_or(d.proj_out_dim),
            ft_proj_selector: self.ft_proj_selector.unwrap_or(0),
            proj_head_mode: self.proj_head_mode.unwrap_or(d.proj_head_mode),
            batch_norm_decay: self.batch_norm_decay.unwrap_or(d.batch_norm_decay),
            num_classes,
            ..d
        }
        .with_image_size(image_size);
        c.validate()?;
        Ok(c)
    }

    /// The architecture flags given on the command line (`--ft-proj-selector` is not one: it
    /// applies to a loaded network too).
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("--resnet-depth", self.resnet_depth.is_some()),
            ("--width-multiplier", self.width_multiplier.is_some()),
            ("--sk-ratio", self.sk_ratio.is_some()),
            ("--base-width", self.base_width.is_some()),
            ("--num-proj-layers", self.num_proj_layers.is_some()),
            ("--proj-out-dim", self.proj_out_dim.is_some()),
            ("--proj-head-mode", self.proj_head_mode.is_some()),
            ("--batch-norm-decay", self.batch_norm_decay.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, set)| set.then_some(flag))
        .collect()
    }

    /// Refuses architecture flags where `source` fixes the architecture.
    pub fn refuse_with(&self, source: &str) -> Result<()> {
        let given = self.given();
        if !given.is_empty() {
            bail!(
                "{} would be ignored: the architecture comes from {source}",
                given.join(", ")
            );
        }
        Ok(())
    }
}

/// Batch, schedule and optimizer flags shared by the training subcommands. A flag left unset
/// keeps the stage's own default (the official value, set by the stage's config constructor).
#[derive(Args, Clone, Debug)]
pub struct TrainArgs {
    #[arg(long)]
    pub train_batch_size: Option<usize>,
    #[arg(long)]
    pub train_epochs: Option<u64>,
    /// Overrides the step count derived from the epochs (at least 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub train_steps: Option<u64>,
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// linear (base·B/256) or sqrt (base·√B).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["linear", "sqrt"])
        .try_map(|s| s.parse::<LearningRateScaling>()))]
    pub learning_rate_scaling: Option<LearningRateScaling>,
    #[arg(long)]
    pub warmup_epochs: Option<f64>,
    #[arg(long)]
    pub weight_decay: Option<f64>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(OptimizerKind::ALL.map(|(name, _)| name))
        .try_map(|s| s.parse::<OptimizerKind>()))]
    pub optimizer: Option<OptimizerKind>,
    #[arg(long)]
    pub momentum: Option<f64>,
    /// f32, or bf16 products with f32 master weights, BN statistics and losses.
    #[arg(long)]
    pub precision: Option<Precision>,
}

impl TrainArgs {
    /// Overwrites the stage defaults with the flags that were given.
    pub fn apply(&self, settings: &mut StageSettings) {
        let StageSettings {
            train_batch_size: batch,
            schedule,
            optimizer,
            precision,
            ..
        } = settings;
        fn set<T: Clone>(slot: &mut T, flag: &Option<T>) {
            if let Some(v) = flag {
                *slot = v.clone();
            }
        }
        set(batch, &self.train_batch_size);
        set(&mut schedule.train_epochs, &self.train_epochs);
        if self.train_steps.is_some() {
            schedule.train_steps = self.train_steps;
        }
        set(&mut schedule.learning_rate, &self.learning_rate);
        set(
            &mut schedule.learning_rate_scaling,
            &self.learning_rate_scaling,
        );
        set(&mut schedule.warmup_epochs, &self.warmup_epochs);
        set(&mut optimizer.weight_decay, &self.weight_decay);
        set(&mut optimizer.optimizer, &self.optimizer);
        set(&mut optimizer.momentum, &self.momentum);
        set(precision, &self.precision);
    }
}

/// `--device cpu|cuda[:N]`: CUDA by default when built with it and a GPU is present.
pub fn device(spec: Option<&str>) -> Result<Device> {
    match spec {
        None => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        Some("cpu") => Ok(Device::Cpu),
        Some(s) if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse::<usize>()
                    .with_context(|| format!("--device {s}: bad GPU number"))?,
                None => 0,
            };
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA (rebuild with --features cuda)");
            }
            Ok(Device::new_cuda(ordinal)?)
        }
        Some(s) => bail!("--device {s}: expected cpu, cuda or cuda:N"),
    }
}

/// The file a training subcommand writes its resolved settings to, in its output folder;
/// `--config` reads it back.
pub const STAGE_CONFIG_FILE: &str = "config.json";

/// A stage's settings from a run file: TOML when the name ends in `.toml`, JSON otherwise (the
/// `config.json` a run writes). Errors name the file.
pub fn stage_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    read_run_file(
        path,
        &format!("this stage's configuration (as the {STAGE_CONFIG_FILE} of its runs)"),
    )
}

/// A run file as `T`: TOML when the name ends in `.toml`, JSON otherwise; an error names the
/// file and says it is not `what`.
pub fn read_run_file<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("run file {} cannot be read", path.display()))?;
    let not = || format!("run file {} is not {what}", path.display());
    if path.extension().is_some_and(|e| e == "toml") {
        toml::from_str(&text).with_context(not)
    } else {
        serde_json::from_str(&text).with_context(not)
    }
}

/// Writes a stage's resolved settings into its output folder (atomically), for `--config`.
pub fn write_stage_config(dir: &std::path::Path, cfg: &impl serde::Serialize) -> Result<()> {
    let path = dir.join(STAGE_CONFIG_FILE);
    let text = serde_json::to_string_pretty(cfg)?;
    simclr_fs::write_atomic(&path, format!("{text}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
