//! The distillation stage.

use simclr_train::StageEnv;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use simclr_data::augment::AugmentConfig;
use simclr_data::{Batch, Dataset, Loader, LoaderConfig};
use simclr_models::checkpoint::{self, assign_variables};
use simclr_models::{ModelConfig, Precision, SimclrModel};
use simclr_train::optim::OptimizerSettings;
use simclr_train::schedule::LrScheduleConfig;
use simclr_train::{run_stage, StageRun, StepOutput, TrainError, TrainSummary, TrainTask};

use crate::loss::distillation_loss;

/// Stages whose checkpoints can teach.
pub const TEACHER_STAGES: [&str; 2] = ["finetune", "supervised"];

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillConfig {
    pub image_size: usize,
    pub train_batch_size: usize,
    pub schedule: LrScheduleConfig,
    pub optimizer: OptimizerSettings,
    /// Compute dtype of convolutions and matmuls (`--precision`; f32 master weights).
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// τ: 0.1 for self-distillation, 1.0 for big-to-small (the paper's defaults).
    pub temperature: f64,
    /// Multiply the loss by τ² (the official colab does; the paper's equation does not).
    pub tau_squared: bool,
    /// Weight α of the distillation term; `1 − α` weighs cross-entropy on the labelled images
    /// of each batch. 1.0 (distillation only) is the paper's default.
    pub alpha: f64,
    pub augment: AugmentConfig,
    pub seed: u64,
    /// Checkpoint cadence and history, resume policy, loader threads.
    #[serde(flatten)]
    pub run: simclr_train::RunOptions,
}

impl DistillConfig {
    /// The paper's setting: the pretraining schedule, crop + flip, distillation loss only.
    pub fn new(image_size: usize, self_distillation: bool) -> Self {
        DistillConfig {
            image_size,
            train_batch_size: 4096,
            schedule: LrScheduleConfig {
                train_epochs: 400,
                ..LrScheduleConfig::default()
            },
            optimizer: OptimizerSettings {
                weight_decay: 1e-4,
                ..OptimizerSettings::default()
            },
            precision: Precision::F32,
            temperature: if self_distillation { 0.1 } else { 1.0 },
            tau_squared: false,
            alpha: 1.0,
            augment: AugmentConfig::finetune(image_size),
            seed: 0,
            run: simclr_train::RunOptions::default(),
        }
    }

    /// Refuses settings that have no meaning: the softmax temperature must be positive and the
    /// weight of the distillation term a fraction.
    pub fn validate(&self) -> simclr_train::Result<()> {
        let bad = |what: String| Err(TrainError::InvalidConfig(what));
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "distillation temperature must be finite and positive, got {}",
                self.temperature
            ));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return bad(format!(
                "alpha (the weight of the distillation loss against the labelled loss) must be \
                 in [0, 1], got {}",
                self.alpha
            ));
        }
        Ok(())
    }
}

/// Where the student starts.
#[derive(Clone, Debug)]
pub enum StudentInit {
    /// Random weights of this architecture (its supervised head gets the teacher's classes).
    Scratch(ModelConfig),
    /// The weights of a checkpoint (e.g. the pretrained network the teacher came from).
    Checkpoint(PathBuf),
}

pub struct DistillTask {
    teacher: SimclrModel,
    student: SimclrModel,
    config: ModelConfig,
    varmap: VarMap,
    labelled: HashSet<usize>,
    cfg: DistillConfig,
    device: Device,
}

fn terr(e: impl std::fmt::Display) -> TrainError {
    TrainError::InvalidConfig(e.to_string())
}

impl DistillTask {
    /// Loads the teacher and builds the student; checks stages and class counts before any work.
    pub fn new(
        teacher_path: &Path,
        student: &StudentInit,
        cfg: &DistillConfig,
        num_classes: usize,
        labelled: &[usize],
        device: &Device,
    ) -> simclr_train::Result<Self> {
        let mut teacher = checkpoint::load(teacher_path, device)?;
        teacher.model = teacher.model.with_precision(cfg.precision);
        if !TEACHER_STAGES.contains(&teacher.meta.stage.as_str()) {
            return Err(TrainError::InvalidConfig(format!(
                "{}: a checkpoint of stage {:?} cannot teach; use a fine-tuned one ({TEACHER_STAGES:?})",
                teacher_path.display(),
                teacher.meta.stage
            )));
        }
        match teacher.meta.config.num_classes {
            Some(c) if c == num_classes => {}
            other => {
                return Err(TrainError::InvalidConfig(format!(
                    "{}: the teacher predicts {other:?} classes, the dataset has {num_classes}",
                    teacher_path.display()
                )))
            }
        }
        let (base, init) = match student {
            StudentInit::Scratch(c) => (c.clone(), None),
            StudentInit::Checkpoint(p) => {
                let (meta, tensors) = checkpoint::load_tensors(p, device)?;
                (meta.config, Some(tensors))
            }
        };
        let (base_classes, base_selector) = (base.num_classes, base.ft_proj_selector);
        let config = ModelConfig {
            num_classes: Some(num_classes),
            ft_proj_selector: teacher.meta.config.ft_proj_selector,
            fine_tune_after_block: -1,
            ..base
        };
        let varmap = VarMap::new();
        let model = SimclrModel::init(&config, &varmap, cfg.seed, device)
            .map_err(terr)?
            .with_precision(cfg.precision);
        if let Some(t) = init {
            // The checkpoint's supervised head is kept when it predicts the same classes from
            // the same input (a teacher's own weights); otherwise the student's head is new.
            let same_head =
                base_classes == Some(num_classes) && base_selector == config.ft_proj_selector;
            assign_variables(&varmap, &t, |n| {
                !same_head && n.starts_with("head_supervised")
            })?;
        }
        Ok(DistillTask {
            teacher: teacher.model,
            student: model,
            config,
            varmap,
            labelled: labelled.iter().copied().collect(),
            cfg: cfg.clone(),
            device: device.clone(),
        })
    }

    pub fn student(&self) -> &SimclrModel {
        &self.student
    }

    pub fn student_config(&self) -> &ModelConfig {
        &self.config
    }
}

impl TrainTask for DistillTask {
    fn forward(&mut self, batch: &Batch, _step: u64) -> simclr_train::Result<StepOutput> {
        let x = batch.views[0].to_device(&self.device)?;
        let missing = || TrainError::InvalidConfig("a model without a supervised head".into());
        // The teacher labels exactly the view the student sees, in inference mode.
        let t = self
            .teacher
            .forward(&x, false)?
            .logits_sup
            .ok_or_else(missing)?
            .detach();
        let s = self
            .student
            .forward(&x, true)?
            .logits_sup
            .ok_or_else(missing)?;
        let kd = distillation_loss(&s, &t, self.cfg.temperature, self.cfg.tau_squared)?;
        let mut loss = (kd.clone() * self.cfg.alpha)?;
        let agree = s
            .argmax(D::Minus1)?
            .eq(&t.argmax(D::Minus1)?)?
            .to_dtype(DType::F64)?
            .mean_all()?
            .to_scalar::<f64>()?;
        let mut metrics = vec![
            (
                "distill_loss".to_string(),
                kd.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ),
            ("teacher_agreement".to_string(), agree),
        ];
        if self.cfg.alpha < 1.0 {
            let rows: Vec<u32> = (0..batch.indices.len())
                .filter(|&k| self.labelled.contains(&batch.indices[k]))
                .map(|k| k as u32)
                .collect();
            if !rows.is_empty() {
                let idx = Tensor::new(rows.as_slice(), &self.device)?;
                let labels = batch
                    .labels
                    .to_device(&self.device)?
                    .index_select(&idx, 0)?;
                let ce = candle_nn::loss::cross_entropy(&s.index_select(&idx, 0)?, &labels)?;
                metrics.push((
                    "supervised_loss".into(),
                    ce.to_dtype(DType::F64)?.to_scalar::<f64>()?,
                ));
                loss = (loss + (ce * (1.0 - self.cfg.alpha))?)?;
            }
        }
        Ok(StepOutput { loss, metrics })
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
}

/// Distils `teacher` into a student on every image of `train` (the unlabeled set).
pub fn run_distill(
    cfg: &DistillConfig,
    teacher: &Path,
    student: &StudentInit,
    train: Arc<dyn Dataset>,
    labelled: &[usize],
    env: StageEnv,
) -> simclr_train::Result<(TrainSummary, DistillTask)> {
    let StageEnv {
        out_dir,
        resume,
        progress,
        device,
    } = env;
    cfg.validate()?;
    let data_err = |e: simclr_data::DataError| TrainError::Data(e.to_string());
    let mut task = DistillTask::new(teacher, student, cfg, train.num_classes(), labelled, device)?;
    let batch = cfg.train_batch_size.min(train.len());
    let mut lc = LoaderConfig::train(batch, 1, cfg.augment.clone(), cfg.seed);
    lc.num_threads = cfg.run.num_workers;
    let train_classes = train.class_names().to_vec();
    let loader = Loader::new(train, None, lc).map_err(data_err)?;
    let run = StageRun {
        stage: "distill",
        out_dir,
        resume,
        progress,
        options: &cfg.run,
        extra_meta: simclr_train::stage_meta("distill_config", &cfg, Some(&train_classes))?,
    };
    let summary = run_stage(&mut task, &loader, &cfg.schedule, &cfg.optimizer, run)?;
    Ok((summary, task))
}
