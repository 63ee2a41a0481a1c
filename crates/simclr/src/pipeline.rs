//! `cargo xtask pipeline`: pretrain → fine-tune → distill → evaluate, plus the supervised
//! baseline, for one or more label fractions, with a report.
//!
//! One pretraining serves every fraction. Each stage writes into its own folder of
//! `checkpoints/<run>/`, where `<run>` names the dataset, preset and model and ends with a hash of
//! the data and pretraining settings; each later stage's folder name ends with a hash of its own
//! settings and of the stage it starts from. A stage whose checkpoint is complete is reused, an
//! interrupted one resumes, so running the same command again continues where it stopped.

use simclr_train::{StageEnv, StageSettings};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::json;
use simclr_data::split::{
    class_balanced_subset, validate_fraction, validation_split, write_split_file,
};
use simclr_data::{load_dataset, Dataset, DatasetName, Loader, LoaderConfig, Split, SubsetDataset};
use simclr_distill::{run_distill, DistillConfig, StudentInit, TeacherTargets};
use simclr_eval::EvalReport;
use simclr_eval::{knn_top1, KnnData};
use simclr_finetune::{run_finetune, FinetuneConfig, FinetuneInit};
use simclr_models::checkpoint::crash_point;
use simclr_models::{ModelConfig, Precision, Stage};
use simclr_pretrain::{run_pretrain_replica, PretrainConfig, PretrainData};
use simclr_train::TrainSummary;

use crate::args::DataSourceArgs;
use crate::report;

/// How big a run is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// A tiny subset and a few steps per stage: checks the plumbing (CI).
    Smoke,
    /// Sized for a 2-core CPU in about 20 minutes on the committed Fashion-MNIST subset.
    Default,
    /// The paper's settings (ResNet-50, batch 4096, 800 pretraining epochs, …): for GPUs.
    Paper,
}

/// Everything the pipeline does, serialised into the run folder and hashed into its name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PipelineConfig {
    pub preset: Preset,
    pub dataset: String,
    pub fractions: Vec<f64>,
    pub seed: u64,
    /// Use only this many training / test images (class-balanced); `None`: all.
    pub train_subset: Option<usize>,
    pub test_subset: Option<usize>,
    pub pretrain: PretrainConfig,
    /// Fine-tuning settings per fraction, in the order of `fractions`.
    pub finetune: Vec<FinetuneConfig>,
    pub baseline: Vec<FinetuneConfig>,
    pub distill: DistillConfig,
    /// Images per class held out of the training set as a validation split (0: none). With it,
    /// every stage trains on the rest, and every model is evaluated on the held-out images
    /// instead of the test set: the mode in which the presets' settings were chosen
    /// (`docs/results.md`), which never touches the test set.
    #[serde(default)]
    pub validation_per_class: usize,
    /// Where the distillation student starts; `None`: the preset's choice (the pretrained
    /// network, or random weights in the paper preset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub student: Option<StudentStart>,
    /// Label-split files (the official `1percent.txt` format: one training image name per
    /// line), one per entry of `fractions`, giving the labelled images instead of a draw; the
    /// fraction still names the recipe and must match the file's size. Empty: drawn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub split_files: Vec<PathBuf>,
    /// The dataset's splits and columns, and the Hub reader's memory (empty: the defaults).
    #[serde(default, skip_serializing_if = "DataSourceArgs::is_default")]
    pub data: DataSourceArgs,
    /// The labelled stages' batch and step counts are final (a configuration read from a run
    /// file, `from_file`): the pipeline does not size them from the labelled set's size.
    #[serde(skip)]
    pub sized: bool,
}

/// Where the distillation student starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StudentStart {
    /// Random weights (the paper).
    Scratch,
    /// The pretrained network (encoder and projection head; a new supervised head).
    Pretrained,
    /// The fine-tuned teacher's own weights.
    Teacher,
}

impl StudentStart {
    fn as_str(self) -> &'static str {
        match self {
            StudentStart::Scratch => "scratch",
            StudentStart::Pretrained => "pretrained",
            StudentStart::Teacher => "teacher",
        }
    }
}

impl PipelineConfig {
    /// Every stage at `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.pretrain.training.precision = precision;
        for f in self.finetune.iter_mut().chain(self.baseline.iter_mut()) {
            f.training.precision = precision;
        }
        self.distill.training.precision = precision;
        self
    }
}

/// A preset's settings as data: `crates/simclr/presets/<name>.toml` (smoke.toml describes the
/// format), compiled into the binary and applied as `--set` overrides are, so that a misspelt
/// name in a preset fails as it would on the command line.
struct PresetData {
    file: &'static str,
    /// The network, unless `--model` names another.
    model: String,
    table: serde_json::Map<String, serde_json::Value>,
}

impl PresetData {
    fn of(preset: Preset) -> Result<Self> {
        let (file, text) = match preset {
            Preset::Smoke => ("smoke", include_str!("../presets/smoke.toml")),
            Preset::Default => ("default", include_str!("../presets/default.toml")),
            Preset::Paper => ("paper", include_str!("../presets/paper.toml")),
        };
        let mut table: serde_json::Map<String, serde_json::Value> =
            toml::from_str(text).with_context(|| format!("presets/{file}.toml"))?;
        let Some(serde_json::Value::String(model)) = table.remove("model") else {
            bail!("presets/{file}.toml: no `model`")
        };
        Ok(Self { file, model, table })
    }

    /// The preset's settings for `fractions` at `image_size`, as `--set` spells them.
    fn settings(&self, fractions: &[f64], image_size: usize) -> Vec<String> {
        let mut out = Vec::new();
        section_settings(&self.table, fractions, image_size, &mut out);
        out
    }
}

/// The settings of one level of a preset file (the top, or `[small_images]`).
fn section_settings(
    table: &serde_json::Map<String, serde_json::Value>,
    fractions: &[f64],
    image_size: usize,
    out: &mut Vec<String>,
) {
    // `[small_images]` last, so that it overrides what the top level sets, whatever the order
    // of the keys.
    let mut keys: Vec<&String> = table.keys().collect();
    keys.sort_by_key(|k| k.as_str() == "small_images");
    for key in keys {
        let value = &table[key];
        let few = match key.as_str() {
            "finetune_few_labels" => Some(true),
            "finetune_many_labels" => Some(false),
            _ => None,
        };
        match key.as_str() {
            "finetune" | "baseline" => {
                for i in 0..fractions.len() {
                    leaves(&format!("{key}.{i}"), value, out);
                }
            }
            _ if few.is_some() => {
                for (i, &f) in fractions.iter().enumerate() {
                    if Some(simclr_finetune::few_labels(f)) == few {
                        leaves(&format!("finetune.{i}"), value, out);
                    }
                }
            }
            "small_images" => {
                if let (true, Some(t)) = (image_size <= 32, value.as_object()) {
                    section_settings(t, fractions, image_size, out);
                }
            }
            _ => leaves(key, value, out),
        }
    }
}

/// `PATH=VALUE` for every leaf of `value` under `path` (tables become dotted paths).
fn leaves(path: &str, value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                leaves(&format!("{path}.{k}"), v, out);
            }
        }
        v => out.push(format!("{path}={v}")),
    }
}

/// The model named `name` (`r18`, `r50`, `r50_2x_sk1`, `r18_w16`, …) at `image_size` (the CIFAR
/// stem at ≤ 32 px).
pub fn model_for(name: &str, image_size: usize) -> Result<ModelConfig> {
    let c: ModelConfig = name.parse().with_context(|| format!("--model {name}"))?;
    let c = c.with_image_size(image_size);
    c.validate()?;
    Ok(c)
}

impl PipelineConfig {
    /// The settings of `preset` for `dataset` at `image_size`, with `model` overriding the
    /// preset's network.
    pub fn new(
        preset: Preset,
        dataset: &str,
        image_size: usize,
        fractions: &[f64],
        model: Option<&str>,
        seed: u64,
    ) -> Result<Self> {
        for &f in fractions {
            validate_fraction(f)?;
        }
        let data = PresetData::of(preset)?;
        let m = model_for(model.unwrap_or(&data.model), image_size)?;
        let mut pretrain = PretrainConfig::new(m, image_size);
        pretrain.seed = seed;
        let mut distill = DistillConfig::new(image_size, true);
        distill.seed = seed;
        let finetune: Vec<FinetuneConfig> = fractions
            .iter()
            .map(|&f| FinetuneConfig {
                seed,
                ..FinetuneConfig::new(image_size, f)
            })
            .collect();
        // The supervised baseline's own recipe; its batch and step count follow the labelled
        // set's size, known once the data is loaded (`size_labelled_stages`).
        let baseline: Vec<FinetuneConfig> = fractions
            .iter()
            .map(|_| FinetuneConfig {
                seed,
                ..FinetuneConfig::supervised_baseline(image_size, 0)
            })
            .collect();
        let mut cfg = PipelineConfig {
            preset,
            dataset: dataset.to_string(),
            fractions: fractions.to_vec(),
            seed,
            train_subset: None,
            test_subset: None,
            pretrain,
            finetune,
            baseline,
            distill,
            validation_per_class: 0,
            student: None,
            split_files: Vec::new(),
            data: DataSourceArgs::default(),
            sized: false,
        };
        cfg.apply_overrides(&data.settings(fractions, image_size))
            .with_context(|| format!("the {preset:?} preset (presets/{}.toml)", data.file))?;
        Ok(cfg)
    }

    /// A configuration from a run file: the `pipeline.json` or `pipeline.toml` a run writes
    /// into its folder (or one edited from them; TOML when the name ends in `.toml`, JSON
    /// otherwise). Its batch and step counts are used as they are. Errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut cfg: PipelineConfig = crate::args::read_run_file(
            path,
            "a pipeline configuration (as a run's pipeline.json or pipeline.toml)",
        )?;
        for &f in &cfg.fractions {
            validate_fraction(f).with_context(|| format!("run file {}", path.display()))?;
        }
        let n = cfg.fractions.len();
        cfg.check_split_files()
            .with_context(|| format!("run file {}", path.display()))?;
        if cfg.finetune.len() != n || cfg.baseline.len() != n {
            bail!(
                "run file {}: {n} fractions but {} fine-tuning and {} baseline settings",
                path.display(),
                cfg.finetune.len(),
                cfg.baseline.len()
            );
        }
        cfg.sized = true;
        Ok(cfg)
    }

    /// Pairs each fraction with a split file: `files` must be empty or one per fraction.
    pub fn with_split_files(mut self, files: Vec<PathBuf>) -> Result<Self> {
        self.split_files = files;
        self.check_split_files()?;
        Ok(self)
    }

    fn check_split_files(&self) -> Result<()> {
        let (n, m) = (self.fractions.len(), self.split_files.len());
        if m != 0 && m != n {
            bail!("{m} split file(s) for {n} fraction(s): give one --split-file per --fraction, in the same order");
        }
        Ok(())
    }

    /// Sizes the stages that train on the labelled images from their counts (one per fraction,
    /// in the order of `fractions`): the baseline's batch and step count
    /// ([`simclr_finetune::baseline_batch_size`], [`simclr_finetune::baseline_train_steps`])
    /// and, in the default preset, the fine-tuning's. The smoke preset keeps its few steps.
    pub fn size_labelled_stages(&mut self, labelled: &[usize]) {
        if self.preset == Preset::Smoke {
            return;
        }
        for ((b, f), &n) in self
            .baseline
            .iter_mut()
            .zip(self.finetune.iter_mut())
            .zip(labelled)
        {
            b.training.train_batch_size = simclr_finetune::baseline_batch_size(n);
            b.training.schedule.train_steps = Some(simclr_finetune::baseline_train_steps(
                n,
                b.training.train_batch_size,
            ));
            if self.preset == Preset::Default {
                f.training.train_batch_size = simclr_finetune::baseline_batch_size(n);
                f.training.schedule.train_steps =
                    Some(finetune_train_steps(n, f.training.train_batch_size));
            }
        }
    }

    /// Applies `--set PATH=VALUE` overrides to the serialised configuration: `PATH` is
    /// dot-separated field names (`pretrain.schedule.train_epochs`), an index into a per-fraction
    /// list (`finetune.1.train_batch_size`) or `*` for all of its entries
    /// (`baseline.*.optimizer.weight_decay`); `VALUE` is JSON (`0.2`, `true`, `"momentum"`,
    /// `null`), or a bare string. A path that does not exist, or a value of the wrong type, is an
    /// error naming it.
    pub fn apply_overrides(&mut self, overrides: &[String]) -> Result<()> {
        if overrides.is_empty() {
            return Ok(());
        }
        let parsed: Vec<(&str, Vec<&str>, serde_json::Value)> = overrides
            .iter()
            .map(|o| {
                let (path, raw) = o
                    .split_once('=')
                    .with_context(|| format!("--set {o}: expected PATH=VALUE"))?;
                let new = serde_json::from_str(raw)
                    .unwrap_or_else(|_| serde_json::Value::String(raw.to_string()));
                Ok((o.as_str(), path.split('.').collect(), new))
            })
            .collect::<Result<_>>()?;
        let mut value = serde_json::to_value(&*self)?;
        for (o, parts, new) in &parsed {
            match set_path(&mut value, parts, new) {
                Some(n) if n > 0 => {}
                _ => bail!("--set {o}: no setting {}", parts.join(".")),
            }
        }
        let cfg: PipelineConfig = serde_json::from_value(value)
            .with_context(|| format!("--set {}: a value of the wrong type", overrides.join(" ")))?;
        // A misspelt last name would be created and then dropped by serde: check that each
        // override is there once the configuration is read back (or, for a setting that is
        // left out of the serialised form at its default value, that it is a real one).
        let back = serde_json::to_value(&cfg)?;
        for (o, parts, new) in &parsed {
            let mut again = back.clone();
            set_path(&mut again, parts, new);
            if !same_settings(&again, &back) && !is_left_out_default(&back, parts, new) {
                bail!(
                    "--set {o}: {} is not a setting of the pipeline (see pipeline.json)",
                    parts.join(".")
                );
            }
        }
        for &f in &cfg.fractions {
            validate_fraction(f)?;
        }
        *self = PipelineConfig {
            sized: self.sized,
            ..cfg
        };
        Ok(())
    }

    /// `<dataset>-<preset>-<model>-<hash>`, the hash covering the data (and the splits and
    /// columns read) and the pretraining: the
    /// same pretraining always lands in the same folder, whatever the later stages do.
    pub fn run_name(&self) -> String {
        let mut key = json!({
            "dataset": self.dataset,
            "seed": self.seed,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "validation_per_class": self.validation_per_class,
            "pretrain": self.pretrain,
        });
        // Only when set, so that the runs from before these settings keep their folders.
        if !self.data.is_default() {
            key["data"] = serde_json::to_value(&self.data).unwrap_or_default();
        }
        format!(
            "{}-{:?}-{}-{}",
            self.dataset.replace([':', '/'], "_"),
            self.preset,
            self.pretrain.model.name(),
            short_hash(&key)
        )
        .to_lowercase()
    }
}

/// The default preset's fine-tuning length: as long as the supervised baseline at every
/// fraction ([`simclr_finetune::baseline_train_steps`]: 100 epochs, at least 600 steps), chosen
/// on the validation split (`docs/results.md`): at 1 % 600 steps gave 75.1 % against 73.9 % for
/// 300; at 10 % 782 steps at 0.05·B/256 (`presets/default.toml`) gave 84.0 % against 82.4 % for
/// 300 steps.
pub fn finetune_train_steps(labelled: usize, batch: usize) -> u64 {
    simclr_finetune::baseline_train_steps(labelled, batch)
}

/// Sets `parts` (a path into `v`, `*` for every element of a list) to `new`; returns how many
/// places were set, or `None` when a name or index does not exist. An object set over an object
/// changes only the fields it names (`pretrain.memory={"queue_size":4096}` keeps the others).
fn set_path(v: &mut serde_json::Value, parts: &[&str], new: &serde_json::Value) -> Option<usize> {
    let Some((first, rest)) = parts.split_first() else {
        put(v, new);
        return Some(1);
    };
    match v {
        serde_json::Value::Array(items) if *first == "*" => {
            let mut n = 0;
            for item in items {
                n += set_path(item, rest, new)?;
            }
            Some(n)
        }
        serde_json::Value::Array(items) => {
            set_path(items.get_mut(first.parse::<usize>().ok()?)?, rest, new)
        }
        // Optional fields serialise as null (or are left out): a value may be set there.
        serde_json::Value::Object(map) if rest.is_empty() => {
            put(
                map.entry(first.to_string())
                    .or_insert(serde_json::Value::Null),
                new,
            );
            Some(1)
        }
        serde_json::Value::Object(map) => set_path(map.get_mut(*first)?, rest, new),
        _ => None,
    }
}

/// `new` over `slot`: objects field by field, anything else replaced.
fn put(slot: &mut serde_json::Value, new: &serde_json::Value) {
    match (slot, new) {
        (serde_json::Value::Object(old), serde_json::Value::Object(fields)) => {
            for (k, v) in fields {
                put(old.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, _) => *slot = new.clone(),
    }
}

/// Whether `parts` is a setting that `back` (a serialised configuration) leaves out because
/// `new` is its default (`skip_serializing_if`), rather than a misspelt name that serde
/// dropped: another value there must either be refused or show up in the serialised form.
fn is_left_out_default(back: &serde_json::Value, parts: &[&str], new: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    let probe = match new {
        V::Number(n) => n.as_f64().map(|x| V::from(x + 1.0)),
        V::Bool(b) => Some(V::Bool(!b)),
        V::String(_) => Some(V::String("\u{1}not a value".into())),
        _ => None,
    };
    let Some(probe) = probe else {
        return false;
    };
    let mut changed = back.clone();
    if set_path(&mut changed, parts, &probe).is_none() {
        return false;
    }
    match serde_json::from_value::<PipelineConfig>(changed) {
        Err(_) => true,
        Ok(c) => serde_json::to_value(&c).is_ok_and(|v| !same_settings(&v, back)),
    }
}

/// JSON equality where numbers agree to f32 precision: an f32 setting reads back as the f64
/// nearest its f32 value (`0.2` becomes `0.20000000298…`).
fn same_settings(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (a, b) {
        (V::Number(x), V::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => x == y || (x - y).abs() <= 1e-6 * x.abs().max(y.abs()),
            _ => x == y,
        },
        (V::Array(x), V::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_settings(x, y))
        }
        (V::Object(x), V::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_settings(v, w)))
        }
        _ => a == b,
    }
}

/// 8 hex digits of FNV-1a over the JSON form: stable across Rust versions, unlike `DefaultHasher`.
pub fn short_hash(value: &impl Serialize) -> String {
    let text = serde_json::to_string(value).unwrap_or_default();
    let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    format!("{:08x}", hash as u32)
}

/// A stage's folder: its name and the hash of its settings, so changing one stage's settings
/// retrains that stage only (and every stage that depends on it, through `upstream`).
fn stage_dir(parent: &Path, stage: &str, settings: &impl Serialize, upstream: &str) -> PathBuf {
    parent.join(format!(
        "{stage}-{}",
        short_hash(&json!({ "settings": settings, "upstream": upstream }))
    ))
}

/// One trained model's numbers in the report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StageResult {
    pub stage: String,
    pub fraction: Option<f64>,
    pub top1: f64,
    pub top5: Option<f64>,
    pub wall_seconds: f64,
    pub images_per_second: f64,
    pub steps: u64,
    pub checkpoint: PathBuf,
    /// How the model was trained, in words (optimizer, lr, weight decay, batch, steps, epochs).
    #[serde(default)]
    pub recipe: String,
    /// Seconds spent evaluating it (not in `wall_seconds`).
    #[serde(default)]
    pub eval_seconds: f64,
}

/// The labelled images a split file names (indices into `train`), checked against the
/// fraction that names the run: the file must hold about `fraction` of the `total` training
/// images (within a tenth, or one image per class for tiny sets).
fn split_from_file(
    file: &Path,
    fraction: f64,
    train: &dyn Dataset,
    total: usize,
) -> Result<Vec<usize>> {
    let idx = simclr_data::split::read_split_file(file, train)?;
    let expected = fraction * total as f64;
    let slack = (0.1 * expected).max(train.num_classes() as f64);
    if (idx.len() as f64 - expected).abs() > slack {
        bail!(
            "split file {} names {} images, but --fraction {fraction} of {total} training images is about {expected:.0}",
            file.display(),
            idx.len()
        );
    }
    Ok(idx)
}

fn sample_names(ds: &dyn Dataset, idx: &[usize]) -> Vec<String> {
    idx.iter().map(|&i| ds.sample_name(i)).collect()
}

fn class_balanced_cap(
    ds: &Arc<dyn Dataset>,
    n: Option<usize>,
    seed: u64,
) -> Result<Arc<dyn Dataset>> {
    let Some(n) = n else { return Ok(ds.clone()) };
    let f = (n as f64 / ds.len() as f64).min(1.0);
    let idx = class_balanced_subset(&ds.labels(), ds.num_classes(), f, seed)?;
    Ok(Arc::new(SubsetDataset::new(ds.clone(), idx)?))
}

fn supervised_recipe(c: &FinetuneConfig, labelled: usize, init: &str) -> String {
    let batch = c.training.train_batch_size.min(labelled);
    let steps = simclr_train::schedule::train_steps(
        labelled as u64,
        c.training.schedule.train_epochs,
        batch as u64,
        c.training.schedule.train_steps,
    )
    .unwrap_or(0);
    let head = if c.ft_proj_selector == 0 {
        "classifier on the encoder output".to_string()
    } else {
        format!("classifier on projection-head layer {}", c.ft_proj_selector)
    };
    format!(
        "{init}, {head}; {}; crop (min area {}) + flip",
        describe_recipe(&c.training, steps, labelled),
        c.augment.crop_min_area
    )
}

/// The recipe of a supervised stage, in the words the report prints.
/// `steps` of the stage's batch (capped at its `images`).
pub fn describe_recipe(settings: &StageSettings, steps: u64, images: usize) -> String {
    let (optimizer, schedule) = (&settings.optimizer, &settings.schedule);
    let batch = settings.train_batch_size.min(images);
    let opt = match optimizer.optimizer {
        simclr_train::OptimizerKind::Lars => "LARS",
        simclr_train::OptimizerKind::Momentum => "Nesterov momentum SGD",
        simclr_train::OptimizerKind::AdamW => "AdamW",
    };
    let peak = simclr_train::schedule::scaled_lr(
        schedule.learning_rate,
        batch,
        schedule.learning_rate_scaling,
    );
    format!(
        "{opt}, peak lr {peak:.3} ({} {}-scaled), weight decay {}, warmup {} epochs + cosine, batch {batch}, {steps} steps = {:.0} epochs of {images} images",
        schedule.learning_rate,
        schedule.learning_rate_scaling,
        optimizer.weight_decay,
        schedule.warmup_epochs,
        (steps as f64 * batch as f64) / images.max(1) as f64,
    )
}

fn result(stage: &str, fraction: Option<f64>, s: &TrainSummary, r: &EvalReport) -> StageResult {
    StageResult {
        recipe: String::new(),
        eval_seconds: 0.0,
        stage: stage.to_string(),
        fraction,
        top1: r.top1,
        top5: r.top_k_accuracy,
        wall_seconds: s.wall_seconds,
        images_per_second: s.images_per_second,
        steps: s.steps,
        checkpoint: s.checkpoint.clone(),
    }
}

/// Runs the pipeline into `out_root/<run>/` and writes the report there; returns the run folder.
/// With `replica`, pretraining is data-parallel over the replicas; a rank other than 0 returns
/// once it is done.
pub fn run(
    cfg: &PipelineConfig,
    overrides: &[String],
    data_dir: Option<PathBuf>,
    out_root: &Path,
    progress: bool,
    device: &Device,
    replica: Option<&crate::launch::Replica>,
) -> Result<PathBuf> {
    let t0 = Instant::now();
    let mut cfg = cfg.clone();
    // Overrides first, so that a bad one fails before any data is read.
    cfg.apply_overrides(overrides)?;
    let data = load_data(&cfg, data_dir)?;
    let splits = draw_splits(&cfg, &data)?;
    let counts: Vec<usize> = splits.iter().map(Vec::len).collect();
    if !cfg.sized {
        cfg.size_labelled_stages(&counts);
    }
    // Sizing may have overwritten an override of a batch or step count: apply them again.
    cfg.apply_overrides(overrides)?;
    let cfg = &cfg;

    let run_dir = out_root.join(cfg.run_name());
    let rank = replica.map_or(0, |r| r.rank);
    if rank == 0 {
        write_run_files(&run_dir, cfg)?;
    }
    tracing::info!(run = %run_dir.display(), train = %data.train.describe(), eval = %data.test.describe(), eval_split = data.eval_split, "pipeline");
    let ctx = StageContext {
        cfg,
        train: data.train.clone(),
        test: data.test.clone(),
        image_size: cfg.pretrain.training.image_size,
        progress,
        device,
    };
    let Some(pre) = pretrain_stage(&ctx, &run_dir, replica)? else {
        return Ok(run_dir);
    };
    println!(
        "pretraining: {:.0} s, kNN top-1 {:.2}% (random init {:.2}%)",
        pre.summary.wall_seconds,
        100.0 * pre.knn,
        100.0 * pre.knn_random
    );
    let mut results = Vec::new();
    for (k, &f) in cfg.fractions.iter().enumerate() {
        results.extend(fraction_stages(&ctx, &run_dir, k, f, &splits[k], &pre)?);
    }
    let summary = summary_json(&ctx, &pre, data.eval_split, &results, t0);
    report::write(&run_dir, &summary, &results)?;
    let mut line = String::new();
    let _ = write!(line, "report: {}", run_dir.join("report.md").display());
    println!("{line}");
    Ok(run_dir)
}

/// The datasets of a run.
pub(crate) struct RunData {
    /// The training set before a validation split is held out (what fractions count).
    full_train: Arc<dyn Dataset>,
    /// What the stages train on.
    pub(crate) train: Arc<dyn Dataset>,
    /// What every model is evaluated on: the test set, or the validation split.
    pub(crate) test: Arc<dyn Dataset>,
    eval_split: &'static str,
}

pub(crate) fn load_data(cfg: &PipelineConfig, data_dir: Option<PathBuf>) -> Result<RunData> {
    let name: DatasetName = cfg.dataset.parse()?;
    let opts = cfg.data.options(data_dir);
    let full_train = class_balanced_cap(
        &load_dataset(&name, Split::Train, &opts)?,
        cfg.train_subset,
        cfg.seed,
    )?;
    // With a validation split, the held-out training images replace the test set everywhere
    // (kNN queries, every model's evaluation) and train nothing.
    if cfg.validation_per_class > 0 {
        let (rest, val) = validation_split(
            &full_train.labels(),
            full_train.num_classes(),
            cfg.validation_per_class,
            cfg.seed,
        )?;
        let train: Arc<dyn Dataset> = Arc::new(SubsetDataset::new(full_train.clone(), rest)?);
        let test: Arc<dyn Dataset> = Arc::new(SubsetDataset::new(full_train.clone(), val)?);
        return Ok(RunData {
            full_train,
            train,
            test,
            eval_split: "validation",
        });
    }
    let test = class_balanced_cap(
        &load_dataset(&name, Split::Test, &opts)?,
        cfg.test_subset,
        cfg.seed,
    )?;
    Ok(RunData {
        train: full_train.clone(),
        full_train,
        test,
        eval_split: "test",
    })
}

/// The labelled images of each fraction, drawn and checked before the first step, so that a
/// bad fraction fails fast. A fraction counts images of the whole training set, so that tuning
/// with a validation split trains on as many labels as the final run.
pub(crate) fn draw_splits(cfg: &PipelineConfig, data: &RunData) -> Result<Vec<Vec<usize>>> {
    let (train, full) = (data.train.as_ref(), data.full_train.len());
    let mut splits = Vec::new();
    for (k, &f) in cfg.fractions.iter().enumerate() {
        let idx = match cfg.split_files.get(k) {
            Some(file) => split_from_file(file, f, train, full)?,
            None => {
                let of_rest = (f * full as f64 / train.len() as f64).min(1.0);
                class_balanced_subset(&train.labels(), train.num_classes(), of_rest, cfg.seed)?
            }
        };
        simclr_data::split::check_all_classes_labelled(train, &idx)?;
        splits.push(idx);
    }
    Ok(splits)
}

/// `pipeline.json` and `pipeline.toml`: the run's settings.
pub(crate) fn write_run_files(run_dir: &Path, cfg: &PipelineConfig) -> Result<()> {
    simclr_fs::ensure_writable_dir(run_dir)
        .with_context(|| format!("output folder {} cannot be written", run_dir.display()))?;
    // The same settings for hand editing; `--config` reads either file. TOML cannot hold
    // every value JSON can (a seed above i64::MAX, a path that is not UTF-8): then the run
    // goes on with the JSON file alone.
    let toml = toml::to_string_pretty(cfg);
    simclr_data::write_atomic(
        &run_dir.join("pipeline.json"),
        serde_json::to_string_pretty(cfg)?.as_bytes(),
    )?;
    match toml {
        Ok(text) => simclr_data::write_atomic(&run_dir.join("pipeline.toml"), text.as_bytes())?,
        Err(e) => {
            tracing::warn!("pipeline.toml not written (pipeline.json holds the settings): {e}")
        }
    }
    Ok(())
}

/// What every stage of a run shares.
pub(crate) struct StageContext<'a> {
    pub(crate) cfg: &'a PipelineConfig,
    pub(crate) train: Arc<dyn Dataset>,
    pub(crate) test: Arc<dyn Dataset>,
    pub(crate) image_size: usize,
    pub(crate) progress: bool,
    pub(crate) device: &'a Device,
}

impl StageContext<'_> {
    /// Where a stage of the run writes, resuming what is there.
    fn env<'d>(&'d self, out_dir: &'d Path) -> StageEnv<'d> {
        StageEnv {
            out_dir,
            resume: true,
            progress: self.progress,
            device: self.device,
        }
    }

    /// `model`'s report on the evaluation images, and how long it took.
    fn evaluate(&self, model: &simclr_models::SimclrModel) -> Result<(EvalReport, f64)> {
        let t = Instant::now();
        let loader = Loader::new(
            self.test.clone(),
            None,
            LoaderConfig::eval(256, self.image_size),
        )?;
        let report = simclr_eval::evaluate_classifier(model, &loader, self.device, self.progress)?;
        Ok((report, t.elapsed().as_secs_f64()))
    }
}

/// The pretraining and what the report says of it.
pub(crate) struct Pretraining {
    pub(crate) summary: TrainSummary,
    /// kNN top-1 of the pretrained encoder, and of the same network at random initialisation.
    pub(crate) knn: f64,
    pub(crate) knn_random: f64,
    knn_seconds: f64,
}

/// Pretrains (data-parallel with `replica`) and measures the encoder's kNN accuracy; `None` on
/// a rank other than 0, whose work ends here.
pub(crate) fn pretrain_stage(
    ctx: &StageContext,
    run_dir: &Path,
    replica: Option<&crate::launch::Replica>,
) -> Result<Option<Pretraining>> {
    let (cfg, device) = (ctx.cfg, ctx.device);
    let rank = replica.map_or(0, |r| r.rank);
    let collective = match replica {
        Some(r) => crate::launch::replicas(r.world_size, r.rank, Some(&r.rendezvous), device)?,
        None => Arc::new(simclr_collective::SingleReplica),
    };
    let pre_dir = run_dir.join("pretrain");
    let summary = run_pretrain_replica(
        &cfg.pretrain,
        &PretrainData {
            train: ctx.train.clone(),
            test: Some(ctx.test.clone()),
        },
        StageEnv {
            progress: ctx.progress && rank == 0,
            ..ctx.env(&pre_dir)
        },
        collective,
    )?;
    crash_point(|| "pipeline:after:pretrain".into());
    if rank != 0 {
        return Ok(None);
    }
    let knn_data = KnnData {
        bank: Loader::new(
            ctx.train.clone(),
            None,
            LoaderConfig::eval(256, ctx.image_size),
        )?,
        queries: Loader::new(
            ctx.test.clone(),
            None,
            LoaderConfig::eval(256, ctx.image_size),
        )?,
    };
    let t_knn = Instant::now();
    let pretrained = simclr_models::checkpoint::load(&summary.checkpoint, device)?;
    let knn = knn_top1(
        &pretrained.model,
        &knn_data,
        &Default::default(),
        device,
        ctx.progress,
    )?;
    let random_vm = candle_nn::VarMap::new();
    let random =
        simclr_models::SimclrModel::init(&pretrained.meta.config, &random_vm, cfg.seed, device)?;
    let knn_random = knn_top1(
        &random,
        &knn_data,
        &Default::default(),
        device,
        ctx.progress,
    )?;
    Ok(Some(Pretraining {
        summary,
        knn,
        knn_random,
        knn_seconds: t_knn.elapsed().as_secs_f64(),
    }))
}

/// Fraction `k` (`f`) of the run: fine-tuning, the baseline and distillation on `labelled`, each
/// evaluated; their results, with the evaluation reports written beside them.
fn fraction_stages(
    ctx: &StageContext,
    run_dir: &Path,
    k: usize,
    f: f64,
    labelled: &[usize],
    pre: &Pretraining,
) -> Result<Vec<StageResult>> {
    let dir = fraction_dir(ctx, run_dir, k, f, labelled)?;
    let (ft, ft_dir, ft_result, ft_eval) =
        finetune_stage(ctx, &dir, &ctx.cfg.finetune[k], f, labelled, pre)?;
    let (bl_result, bl_eval) = baseline_stage(ctx, &dir, &ctx.cfg.baseline[k], f, labelled)?;
    let (di_result, di_eval) = distill_stage(ctx, &dir, f, labelled, pre, &ft, &ft_dir)?;
    println!(
        "fraction {f}: baseline {:.2}% / fine-tuned {:.2}% / distilled {:.2}% top-1",
        100.0 * bl_eval.top1,
        100.0 * ft_eval.top1,
        100.0 * di_eval.top1
    );
    for (name, report) in [
        ("eval_finetune.md", &ft_eval),
        ("eval_distill.md", &di_eval),
        ("eval_baseline.md", &bl_eval),
    ] {
        simclr_data::write_atomic(&dir.join(name), report.to_markdown().as_bytes())?;
    }
    Ok(vec![ft_result, bl_result, di_result])
}

/// Fraction `k`'s (`f`'s) folder of the run in `run_dir`, with its labelled split written into
/// it.
pub(crate) fn fraction_dir(
    ctx: &StageContext,
    run_dir: &Path,
    k: usize,
    f: f64,
    labelled: &[usize],
) -> Result<PathBuf> {
    // A split file's run lives apart from the drawn split's, so that neither reuses the
    // other's finished stages.
    let dir = match ctx.cfg.split_files.get(k) {
        Some(_) => run_dir.join(format!(
            "fraction-{f}-split-{}",
            short_hash(&sample_names(ctx.train.as_ref(), labelled))
        )),
        None => run_dir.join(format!("fraction-{f}")),
    };
    std::fs::create_dir_all(&dir)?;
    write_split_file(
        &dir.join("labelled_split.txt"),
        ctx.train.as_ref(),
        labelled,
    )?;
    Ok(dir)
}

/// Fine-tunes the pretrained network on `labelled` with `settings` (those of fraction `f`):
/// its summary, folder, result and report.
pub(crate) fn finetune_stage(
    ctx: &StageContext,
    dir: &Path,
    settings: &FinetuneConfig,
    f: f64,
    labelled: &[usize],
    pre: &Pretraining,
) -> Result<(TrainSummary, PathBuf, StageResult, EvalReport)> {
    let ft_dir = stage_dir(dir, "finetune", settings, "");
    let (ft, task) = run_finetune(
        settings,
        &FinetuneInit::Pretrained(pre.summary.checkpoint.clone()),
        Stage::Finetune,
        ctx.train.clone(),
        labelled.to_vec(),
        ctx.env(&ft_dir),
    )?;
    crash_point(|| "pipeline:after:finetune".into());
    let (report, eval_seconds) = ctx.evaluate(task.model())?;
    let mut r = result("finetune", Some(f), &ft, &report);
    r.eval_seconds = eval_seconds;
    r.recipe = supervised_recipe(settings, labelled.len(), "from the pretrained network");
    Ok((ft, ft_dir, r, report))
}

/// Trains the supervised baseline on `labelled` with its own recipe.
pub(crate) fn baseline_stage(
    ctx: &StageContext,
    dir: &Path,
    settings: &FinetuneConfig,
    f: f64,
    labelled: &[usize],
) -> Result<(StageResult, EvalReport)> {
    let (bl, task) = run_finetune(
        settings,
        &FinetuneInit::Scratch(ctx.cfg.pretrain.model.clone()),
        Stage::Supervised,
        ctx.train.clone(),
        labelled.to_vec(),
        ctx.env(&stage_dir(dir, "baseline", settings, "")),
    )?;
    crash_point(|| "pipeline:after:supervised".into());
    let (report, eval_seconds) = ctx.evaluate(task.model())?;
    let mut r = result("baseline", Some(f), &bl, &report);
    r.eval_seconds = eval_seconds;
    r.recipe = supervised_recipe(settings, labelled.len(), "from random initialisation");
    Ok((r, report))
}

/// Distils the fine-tuned teacher (`ft`, in `ft_dir`) into a student on every training image,
/// the student starting where the preset (or `student`) says.
pub(crate) fn distill_stage(
    ctx: &StageContext,
    dir: &Path,
    f: f64,
    labelled: &[usize],
    pre: &Pretraining,
    ft: &TrainSummary,
    ft_dir: &Path,
) -> Result<(StageResult, EvalReport)> {
    let cfg = ctx.cfg;
    // The paper trains the student afresh for 400 epochs; on a CPU budget of minutes a
    // student starts from trained weights (the preset says which).
    let student_tag = cfg.student.unwrap_or(match cfg.preset {
        Preset::Paper => StudentStart::Scratch,
        _ => StudentStart::Pretrained,
    });
    let student = match student_tag {
        StudentStart::Scratch => StudentInit::Scratch(cfg.pretrain.model.clone()),
        StudentStart::Pretrained => StudentInit::Checkpoint(pre.summary.checkpoint.clone()),
        StudentStart::Teacher => StudentInit::Checkpoint(ft.checkpoint.clone()),
    };
    let student_tag = student_tag.as_str();
    // The teacher's folder by its name, not its path: a run folder that was moved (or is
    // compared with another copy) keeps its distillation folder.
    let upstream = format!("{}|student={student_tag}", folder_name(ft_dir));
    let pair = DistillPair {
        teacher: &ft.checkpoint,
        upstream,
        student,
        student_desc: student_tag.to_string(),
    };
    distill_from(ctx, dir, f, labelled, &pair)
}

/// The last component of `dir`, which names a stage by its settings.
pub(crate) fn folder_name(dir: &Path) -> String {
    dir.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// A teacher and the student it is distilled into.
pub(crate) struct DistillPair<'a> {
    /// The fine-tuned teacher's checkpoint.
    pub(crate) teacher: &'a Path,
    /// Names the teacher and the student in the distillation folder's hash (folder names,
    /// not paths, so that a moved run folder keeps its stages).
    pub(crate) upstream: String,
    pub(crate) student: StudentInit,
    /// The student's start, in the report's words.
    pub(crate) student_desc: String,
}

/// Distils `pair`'s teacher into its student on every training image, in a folder of `dir`
/// named by the distillation settings and `pair.upstream`.
pub(crate) fn distill_from(
    ctx: &StageContext,
    dir: &Path,
    f: f64,
    labelled: &[usize],
    pair: &DistillPair,
) -> Result<(StageResult, EvalReport)> {
    let cfg = ctx.cfg;
    let (di, task) = run_distill(
        &cfg.distill,
        pair.teacher,
        &pair.student,
        ctx.train.clone(),
        labelled,
        ctx.env(&stage_dir(dir, "distill", &cfg.distill, &pair.upstream)),
    )?;
    crash_point(|| "pipeline:after:distill".into());
    let (report, eval_seconds) = ctx.evaluate(task.student())?;
    let mut r = result("distill", Some(f), &di, &report);
    r.eval_seconds = eval_seconds;
    let d = &cfg.distill;
    let n = ctx.train.len();
    r.recipe = format!(
        "student from the {} network, teacher: the fine-tuned model, labelling {}; τ {}{}, α {}; {}; on all {n} training images, crop (min area {}) + flip",
        pair.student_desc,
        match d.teacher_targets {
            TeacherTargets::SameView => "the student's augmented view",
            TeacherTargets::Clean => "each un-augmented image once",
        },
        d.temperature,
        if d.tau_squared { " (loss × τ²)" } else { "" },
        d.alpha,
        describe_recipe(&d.training, di.steps, n),
        d.augment.crop_min_area
    );
    Ok((r, report))
}

/// The run's `report.json`.
fn summary_json(
    ctx: &StageContext,
    pre: &Pretraining,
    eval_split: &str,
    results: &[StageResult],
    t0: Instant,
) -> serde_json::Value {
    let (cfg, n) = (ctx.cfg, ctx.train.len());
    json!({
        "run": cfg.run_name(),
        "config": cfg,
        "train": ctx.train.describe(),
        "test": ctx.test.describe(),
        "pretrain": {
            "recipe": format!(
                "NT-Xent τ {}, {}; colour jitter {}, crop min area {}",
                cfg.pretrain.objective.temperature,
                describe_recipe(&cfg.pretrain.training, pre.summary.steps, n),
                cfg.pretrain.augment.color_jitter_strength,
                cfg.pretrain.augment.crop_min_area,
            ),
            "wall_seconds": pre.summary.wall_seconds,
            "images_per_second": pre.summary.images_per_second,
            "steps": pre.summary.steps,
            "knn_top1": pre.knn,
            "knn_top1_random_init": pre.knn_random,
            "checkpoint": pre.summary.checkpoint,
        },
        "knn_seconds": pre.knn_seconds,
        "eval_split": eval_split,
        "results": results,
        "total_wall_seconds": t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::{PipelineConfig, Preset};
    use simclr_distill::TeacherTargets;
    use simclr_train::OptimizerKind;

    fn default_config() -> PipelineConfig {
        PipelineConfig::new(
            Preset::Default,
            "fashion-mnist-subset",
            28,
            &[0.01, 0.1],
            None,
            0,
        )
        .unwrap()
    }

    #[test]
    fn the_baseline_trains_with_the_supervised_recipe_until_it_converges() {
        let mut cfg = default_config();
        cfg.size_labelled_stages(&[100, 1000]);
        for (b, n) in cfg.baseline.iter().zip([100usize, 1000]) {
            assert_eq!(
                b.training.optimizer.optimizer,
                OptimizerKind::Momentum,
                "{n} labels"
            );
            assert_eq!(b.training.optimizer.weight_decay, 5e-4);
            assert_eq!(b.ft_proj_selector, 0, "a plain ResNet");
            assert!(!b.zero_init_logits_layer);
            let steps = b.training.schedule.train_steps.unwrap() as usize;
            // Hundreds of steps and at least 100 epochs, not the fine-tuning stage's tens.
            assert!(steps >= 600, "{steps} steps at {n} labels");
            assert!(
                steps * b.training.train_batch_size >= 100 * n,
                "{steps} steps at {n}"
            );
            // lr 0.1 per 128 images.
            let peak = simclr_train::schedule::scaled_lr(
                b.training.schedule.learning_rate,
                b.training.train_batch_size,
                b.training.schedule.learning_rate_scaling,
            );
            let per_128 = peak * 128.0 / b.training.train_batch_size as f64;
            assert!((per_128 - 0.1).abs() < 1e-12, "{per_128}");
        }
        assert_eq!(cfg.baseline[0].training.train_batch_size, 50);
        assert_eq!(cfg.baseline[0].training.schedule.train_steps, Some(600));
        assert_eq!(cfg.baseline[1].training.train_batch_size, 128);
        assert_eq!(cfg.baseline[1].training.schedule.train_steps, Some(782));
        // Fine-tuning, chosen on the validation split: as long as the baseline, at 0.1 per 128
        // images with 1 % of the labels and a quarter of that with 10 %.
        for (f, (b, per_128)) in cfg
            .finetune
            .iter()
            .zip(cfg.baseline.iter().zip([0.1, 0.025]))
        {
            assert_eq!(
                f.training.schedule.train_steps,
                b.training.schedule.train_steps
            );
            assert_eq!(f.training.train_batch_size, b.training.train_batch_size);
            assert_eq!(f.ft_proj_selector, 1, "from projection-head layer 1");
            let peak = simclr_train::schedule::scaled_lr(
                f.training.schedule.learning_rate,
                f.training.train_batch_size,
                f.training.schedule.learning_rate_scaling,
            );
            let got = peak * 128.0 / f.training.train_batch_size as f64;
            assert!((got - per_128).abs() < 1e-12, "{got} per 128 images");
        }
        // The seed reaches every stage.
        let other = PipelineConfig::new(Preset::Default, "x", 28, &[0.1], None, 7).unwrap();
        assert_eq!(other.baseline[0].seed, 7);
        assert_eq!(other.finetune[0].seed, 7);
        assert_eq!(other.distill.seed, 7);
        assert_eq!(other.pretrain.seed, 7);
    }

    #[test]
    fn overrides_set_one_value_every_entry_or_fail_by_name() {
        let mut cfg = default_config();
        cfg.apply_overrides(&[
            "pretrain.schedule.train_epochs=11".into(),
            "baseline.*.optimizer.weight_decay=1e-3".into(),
            "finetune.1.optimizer.optimizer=lars".into(),
            "distill.schedule.train_steps=5".into(),
            // An f32 setting left out of pipeline.json while it has its default value.
            "pretrain.augment.crop_min_area=0.2".into(),
            // The same kind of setting set to that default value, which it then leaves out
            // again (the default preset's distillation crops at 0.5).
            "distill.augment.crop_min_area=0.08".into(),
            "distill.teacher_targets=clean".into(),
        ])
        .unwrap();
        assert_eq!(cfg.pretrain.augment.crop_min_area, 0.2);
        assert_eq!(cfg.distill.augment.crop_min_area, 0.08);
        assert_eq!(cfg.distill.teacher_targets, TeacherTargets::Clean);
        cfg.apply_overrides(&["distill.teacher_targets=same_view".into()])
            .unwrap();
        assert_eq!(cfg.distill.teacher_targets, TeacherTargets::SameView);
        assert_eq!(cfg.pretrain.training.schedule.train_epochs, 11);
        assert!(cfg
            .baseline
            .iter()
            .all(|b| b.training.optimizer.weight_decay == 1e-3));
        assert_eq!(
            cfg.finetune[1].training.optimizer.optimizer,
            OptimizerKind::Lars
        );
        assert_eq!(
            cfg.finetune[0].training.optimizer.optimizer,
            OptimizerKind::Momentum
        );
        assert_eq!(cfg.distill.training.schedule.train_steps, Some(5));
        // An object sets only the fields it names: over nothing (the memory buffer is off in
        // the preset), the others take their defaults; over an object, the others are kept.
        cfg.apply_overrides(&[r#"pretrain.memory={"queue_size":4096,"ema_decay":0.99}"#.into()])
            .unwrap();
        let memory = cfg.pretrain.memory.unwrap();
        assert_eq!((memory.queue_size, memory.ema_decay), (4096, 0.99));
        assert_eq!(
            memory.bn_statistics,
            simclr_pretrain::memory::MemoryConfig::default().bn_statistics
        );
        cfg.apply_overrides(&[r#"pretrain.memory={"queue_size":8192}"#.into()])
            .unwrap();
        let memory = cfg.pretrain.memory.unwrap();
        assert_eq!((memory.queue_size, memory.ema_decay), (8192, 0.99));
        let before = serde_json::to_string(&cfg).unwrap();
        for (bad, says) in [
            ("pretrain.schedule.train_epoch=3", "train_epoch"),
            ("finetune.9.seed=1", "finetune.9.seed"),
            ("fractions=[1.5]", "1.5"),
            ("pretrain.train_batch_size=big", "wrong type"),
            ("pretrain.augment.crop_min_areas=0.2", "crop_min_areas"),
            // Misspelt names whose value is a default elsewhere, and a value of no variant.
            ("distill.augment.crop_min_aera=0.08", "crop_min_aera"),
            ("distill.teacher_target=same_view", "teacher_target"),
            ("distill.teacher_targets=noisy", "wrong type"),
            (r#"pretrain.memory={"queue_sise":1}"#, "pretrain.memory"),
            ("no-equals-sign", "PATH=VALUE"),
        ] {
            let err = format!("{:#}", cfg.apply_overrides(&[bad.into()]).unwrap_err());
            assert!(err.contains(says), "{bad}: {err}");
        }
        assert_eq!(
            serde_json::to_string(&cfg).unwrap(),
            before,
            "nothing half-applied"
        );
    }

    #[test]
    fn data_settings_name_the_run_and_are_absent_by_default() {
        let a = default_config();
        let json = serde_json::to_value(&a).unwrap();
        assert!(
            json.get("data").is_none(),
            "a default run's settings and name stay as before"
        );
        let mut b = a.clone();
        b.data.train_split = Some("train_small".into());
        assert_ne!(
            a.run_name(),
            b.run_name(),
            "another training split is another run"
        );
        let mut c = a.clone();
        c.data.hf_cache_mib = Some(64);
        assert_ne!(
            a.run_name(),
            c.run_name(),
            "the cache sets the shuffle's window"
        );
        let back: PipelineConfig =
            serde_json::from_value(serde_json::to_value(&b).unwrap()).unwrap();
        assert_eq!(back.data, b.data);
    }

    #[test]
    fn preset_files_apply_per_fraction_and_size_and_refuse_unknown_names() {
        let c = PipelineConfig::new(
            Preset::Default,
            "fashion-mnist-subset",
            28,
            &[0.01, 0.1],
            None,
            0,
        )
        .unwrap();
        assert_eq!(
            c.finetune[0].training.schedule.learning_rate, 0.2,
            "few labels"
        );
        assert_eq!(
            c.finetune[1].training.schedule.learning_rate, 0.05,
            "many labels"
        );
        assert_eq!(c.student, Some(super::StudentStart::Teacher));
        let small = PipelineConfig::new(Preset::Paper, "cifar10", 32, &[0.1], None, 0).unwrap();
        let large =
            PipelineConfig::new(Preset::Paper, "imagefolder", 224, &[0.1], None, 0).unwrap();
        assert_eq!(small.pretrain.objective.temperature, 0.5, "[small_images]");
        assert_ne!(large.pretrain.objective.temperature, 0.5);
        assert_eq!(large.pretrain.training.train_batch_size, 4096);
        let bad = super::PresetData {
            file: "bad",
            model: "r18".into(),
            table: toml::from_str("[pretrain]\ntrain_batchsize = 3\n").unwrap(),
        };
        let mut cfg = c.clone();
        let e = cfg
            .apply_overrides(&bad.settings(&[0.01, 0.1], 28))
            .unwrap_err();
        assert!(
            format!("{e:#}").contains("pretrain.train_batchsize"),
            "{e:#}"
        );
    }

    #[test]
    fn the_verdict_spells_out_the_sign() {
        let r = |stage: &str, f: f64, top1: f64| super::StageResult {
            stage: stage.into(),
            fraction: Some(f),
            top1,
            top5: None,
            wall_seconds: 0.0,
            images_per_second: 0.0,
            steps: 0,
            checkpoint: Default::default(),
            recipe: String::new(),
            eval_seconds: 0.0,
        };
        let lines = crate::report::verdicts(
            &[
                r("finetune", 0.01, 0.70),
                r("baseline", 0.01, 0.64),
                r("distill", 0.01, 0.725),
                r("finetune", 0.1, 0.80),
                r("baseline", 0.1, 0.846),
                r("distill", 0.1, 0.846),
            ],
            "test",
        );
        assert_eq!(lines.len(), 2);
        for (line, says) in [
            (0, "distilled 72.50% is 8.50 points ABOVE"),
            (0, "fine-tuned 70.00% is 6.00 points ABOVE"),
            (1, "fine-tuned 80.00% is 4.60 points BELOW"),
            (1, "distilled 84.60% is 0.00 points LEVEL WITH"),
        ] {
            assert!(lines[line].contains(says), "{}", lines[line]);
        }
    }
}
