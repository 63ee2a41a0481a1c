//! Fine-tuning, linear evaluation and the supervised baseline: one task, three initialisations.

use simclr_train::StageEnv;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::Device;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use simclr_data::augment::AugmentConfig;
use simclr_data::split::check_all_classes_labelled;
use simclr_data::{Batch, Dataset, Loader, LoaderConfig};
use simclr_models::checkpoint::{self, assign_variables};
use simclr_models::{ModelConfig, Precision, SimclrModel, Stage};
use simclr_train::optim::{OptimizerKind, OptimizerSettings};
use simclr_train::schedule::{LearningRateScaling, LrScheduleConfig};
use simclr_train::{
    run_stage, StageRun, StageSettings, StepOutput, TrainError, TrainSummary, TrainTask,
};

/// Settings with the official names; defaults are the SimCLRv2 1 % recipe (the official README's fine-tuning commands):
/// LARS, `learning_rate` 0.005 with sqrt scaling (0.16 at batch 1024), no weight decay, no
/// warmup, `ft_proj_selector` 1, zero-initialised logits layer, crop + flip.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneConfig {
    /// Input size, batch, schedule, optimizer, precision (flattened: the fields sit at this
    /// level in JSON and TOML).
    #[serde(flatten)]
    pub training: StageSettings,
    pub ft_proj_selector: i32,
    /// -1 trains everything; 4 freezes the encoder (linear evaluation).
    pub fine_tune_after_block: i32,
    pub zero_init_logits_layer: bool,
    pub augment: AugmentConfig,
    pub seed: u64,
    /// Checkpoint cadence and history, resume policy, loader threads.
    #[serde(flatten)]
    pub run: simclr_train::RunOptions,
}

/// Whether `fraction` is the paper's "few labels" regime (1 % or less), which fine-tunes longer.
pub fn few_labels(fraction: f64) -> bool {
    fraction <= 0.01 + 1e-9
}

/// The paper's fine-tuning epochs: 60 for 1 % labels, 30 for 10 % and 100 %.
pub fn epochs_for_fraction(fraction: f64) -> u64 {
    if few_labels(fraction) {
        60
    } else {
        30
    }
}

impl FinetuneConfig {
    pub fn new(image_size: usize, fraction: f64) -> Self {
        FinetuneConfig {
            training: StageSettings {
                image_size,
                train_batch_size: 1024,
                schedule: LrScheduleConfig {
                    learning_rate: 0.005,
                    learning_rate_scaling: LearningRateScaling::Sqrt,
                    warmup_epochs: 0.0,
                    train_epochs: epochs_for_fraction(fraction),
                    train_steps: None,
                },
                optimizer: OptimizerSettings {
                    optimizer: OptimizerKind::Lars,
                    weight_decay: 0.0,
                    ..OptimizerSettings::default()
                },
                precision: Precision::F32,
            },
            ft_proj_selector: 1,
            fine_tune_after_block: -1,
            zero_init_logits_layer: true,
            augment: AugmentConfig::finetune(image_size),
            seed: 0,
            run: simclr_train::RunOptions::default(),
        }
    }
}

/// The supervised baseline's batch: 128 images (the recipe's lr is 0.1 per 128), or half the
/// labelled set when that is smaller, so that an epoch is at least two steps.
pub fn baseline_batch_size(labelled: usize) -> usize {
    128.min(labelled / 2).max(1)
}

/// The supervised baseline's step count: 100 epochs of the labelled set, and never fewer than
/// 600 steps: the schedule the issue measured for the 28×28 baselines (64.55 % at 1 %, 84.60 %
/// at 10 %); on the validation split their training loss flattens over its last hundred steps
/// (`docs/results.md`, "Choosing the settings").
pub fn baseline_train_steps(labelled: usize, batch: usize) -> u64 {
    let epochs_100 = (100 * labelled).div_ceil(batch.max(1)) as u64;
    epochs_100.max(600)
}

impl FinetuneConfig {
    /// The supervised baseline's own recipe (not the fine-tuning one): the usual way a ResNet is
    /// trained from scratch on a small labelled set. Nesterov momentum 0.9, lr 0.1 per 128
    /// images (`learning_rate` 0.2, linear scaling) with one warmup epoch and a cosine decay,
    /// weight decay 5e-4 on every weight but BN's, crop + flip, [`baseline_train_steps`] steps; the
    /// classifier sits on the encoder output (`ft_proj_selector` 0: a plain ResNet) with the
    /// usual random initialisation.
    pub fn supervised_baseline(image_size: usize, labelled: usize) -> Self {
        let batch = baseline_batch_size(labelled);
        FinetuneConfig {
            training: StageSettings {
                image_size,
                train_batch_size: batch,
                schedule: LrScheduleConfig {
                    learning_rate: 0.2,
                    learning_rate_scaling: LearningRateScaling::Linear,
                    warmup_epochs: 1.0,
                    train_epochs: 100,
                    train_steps: Some(baseline_train_steps(labelled, batch)),
                },
                optimizer: OptimizerSettings {
                    optimizer: OptimizerKind::Momentum,
                    momentum: 0.9,
                    weight_decay: 5e-4,
                    ..OptimizerSettings::default()
                },
                precision: Precision::F32,
            },
            ft_proj_selector: 0,
            fine_tune_after_block: -1,
            zero_init_logits_layer: false,
            augment: AugmentConfig::finetune(image_size),
            seed: 0,
            run: simclr_train::RunOptions::default(),
        }
    }
}

/// Where the network starts.
#[derive(Clone, Debug)]
pub enum FinetuneInit {
    /// A pretrained (or imported) checkpoint: fine-tuning or linear evaluation.
    Pretrained(PathBuf),
    /// Random initialisation of this architecture: the supervised baseline.
    Scratch(ModelConfig),
}

pub struct FinetuneTask {
    config: ModelConfig,
    varmap: VarMap,
    model: SimclrModel,
    device: Device,
}

impl FinetuneTask {
    /// Builds the network for `num_classes`; checks the checkpoint's stage before any work.
    pub fn new(
        init: &FinetuneInit,
        cfg: &FinetuneConfig,
        num_classes: usize,
        device: &Device,
    ) -> simclr_train::Result<Self> {
        let (base, pretrained) = match init {
            FinetuneInit::Pretrained(path) => {
                let meta = checkpoint::read_meta(path)?;
                if !Stage::name_in(&meta.stage, &Stage::PRETRAINED) {
                    return Err(TrainError::WrongStage {
                        path: path.clone(),
                        found: meta.stage,
                        stage: Stage::Finetune,
                        expected: &Stage::PRETRAINED,
                    });
                }
                let (_, tensors) = checkpoint::load_tensors(path, device)?;
                (meta.config, Some(tensors))
            }
            FinetuneInit::Scratch(c) => (c.clone(), None),
        };
        let config = ModelConfig {
            num_classes: Some(num_classes),
            ft_proj_selector: cfg.ft_proj_selector,
            fine_tune_after_block: cfg.fine_tune_after_block,
            ..base
        };
        config.validate()?;
        let varmap = VarMap::new();
        let model = SimclrModel::init(&config, &varmap, cfg.seed, device)?
            .with_precision(cfg.training.precision);
        if let Some(tensors) = pretrained {
            // The supervised head is new (its input or class count may differ); the official
            // code zeroes it (`zero_init_logits_layer`).
            assign_variables(&varmap, &tensors, |n| n.starts_with("head_supervised"))?;
            if cfg.zero_init_logits_layer {
                let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
                for (_, v) in data
                    .iter()
                    .filter(|(n, _)| n.starts_with("head_supervised"))
                {
                    v.set(&v.as_tensor().zeros_like()?)?;
                }
            }
        }
        Ok(FinetuneTask {
            config,
            varmap,
            model,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &SimclrModel {
        &self.model
    }
}

impl TrainTask for FinetuneTask {
    fn forward(&mut self, batch: &Batch, _step: u64) -> simclr_train::Result<StepOutput> {
        let x = batch.views[0].to_device(&self.device)?;
        let out = self.model.forward(&x, true)?;
        let logits = out.logits_sup.ok_or_else(|| TrainError::NoSupervisedHead {
            what: "the fine-tuned model".into(),
        })?;
        let labels = batch.labels.to_device(&self.device)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
        let acc = simclr_train::batch_accuracy(&logits, &labels)?;
        Ok(StepOutput {
            loss,
            metrics: vec![("supervised_acc".into(), acc)],
        })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
}

/// Trains on the images `labelled` of `train` into `out_dir`, as stage `stage`
/// ([`Stage::Finetune`], [`Stage::LinearEval`] or [`Stage::Supervised`]).
pub fn run_finetune(
    cfg: &FinetuneConfig,
    init: &FinetuneInit,
    stage: Stage,
    train: Arc<dyn Dataset>,
    labelled: Vec<usize>,
    env: StageEnv,
) -> simclr_train::Result<(TrainSummary, FinetuneTask)> {
    check_all_classes_labelled(train.as_ref(), &labelled)?;
    let mut task = FinetuneTask::new(init, cfg, train.num_classes(), env.device)?;
    // Small labelled sets: the batch never exceeds the set (the official batch is 1024).
    let batch = cfg.training.train_batch_size.min(labelled.len());
    let mut lc = LoaderConfig::train(batch, 1, cfg.augment.clone(), cfg.seed);
    lc.num_threads = cfg.run.num_workers;
    let train_classes = train.class_names().to_vec();
    let loader = Loader::new(train, Some(labelled), lc)?;
    let run = StageRun {
        stage,
        env,
        options: &cfg.run,
        extra_meta: simclr_train::stage_meta("finetune_config", &cfg, Some(&train_classes))?,
    };
    let summary = run_stage(&mut task, &loader, &cfg.training, run)?;
    Ok((summary, task))
}
