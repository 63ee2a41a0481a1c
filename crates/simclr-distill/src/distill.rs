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
use simclr_models::{ModelConfig, Precision, SimclrModel, Stage};
use simclr_train::optim::OptimizerSettings;
use simclr_train::schedule::LrScheduleConfig;
use simclr_train::{
    run_stage, StageRun, StageSettings, StepOutput, TrainError, TrainSummary, TrainTask,
};

use crate::loss::distillation_loss;

/// What the teacher labels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherTargets {
    /// The augmented view the student sees, at every step (the official colab).
    #[default]
    SameView,
    /// The whole image without augmentation, once before training (as Noisy Student labels:
    /// the teacher sees clean images, the student augmented ones). One teacher pass over the
    /// data instead of one per epoch, and targets from views that still show the object.
    Clean,
}

impl TeacherTargets {
    fn is_same_view(&self) -> bool {
        *self == TeacherTargets::SameView
    }
}

impl std::str::FromStr for TeacherTargets {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "same_view" | "same-view" => Ok(TeacherTargets::SameView),
            "clean" => Ok(TeacherTargets::Clean),
            other => Err(format!(
                "unknown teacher targets {other:?}: expected same_view or clean"
            )),
        }
    }
}

/// The largest table of clean teacher logits kept in memory (`TeacherTargets::Clean`).
pub const MAX_CLEAN_TARGET_BYTES: usize = 2 << 30;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DistillConfig {
    /// Input size, batch, schedule, optimizer, precision (flattened: the fields sit at this
    /// level in JSON and TOML).
    #[serde(flatten)]
    pub training: StageSettings,
    /// τ: 0.1 for self-distillation, 1.0 for big-to-small (the paper's defaults).
    pub temperature: f64,
    /// Multiply the loss by τ² (the official colab does; the paper's equation does not).
    pub tau_squared: bool,
    /// Weight α of the distillation term; `1 − α` weighs cross-entropy on the labelled images
    /// of each batch. 1.0 (distillation only) is the paper's default.
    pub alpha: f64,
    /// What the teacher labels (absent from older configs: the same view).
    #[serde(default, skip_serializing_if = "TeacherTargets::is_same_view")]
    pub teacher_targets: TeacherTargets,
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
            training: StageSettings {
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
            },
            temperature: if self_distillation { 0.1 } else { 1.0 },
            tau_squared: false,
            alpha: 1.0,
            teacher_targets: TeacherTargets::SameView,
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
    /// `TeacherTargets::Clean`: the teacher's logits of every image, `[dataset len, classes]`.
    clean_targets: Option<Tensor>,
}

fn no_head() -> TrainError {
    TrainError::NoSupervisedHead {
        what: "the teacher or the student".into(),
    }
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
        teacher.model = teacher.model.with_precision(cfg.training.precision);
        if !Stage::name_in(&teacher.meta.stage, &Stage::TEACHERS) {
            return Err(TrainError::WrongStage {
                path: teacher_path.to_path_buf(),
                found: teacher.meta.stage,
                stage: Stage::Distill,
                expected: &Stage::TEACHERS,
            });
        }
        match teacher.meta.config.num_classes {
            Some(c) if c == num_classes => {}
            found => {
                return Err(TrainError::ClassCount {
                    path: teacher_path.to_path_buf(),
                    found,
                    expected: num_classes,
                })
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
        let model = SimclrModel::init(&config, &varmap, cfg.seed, device)?
            .with_precision(cfg.training.precision);
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
            clean_targets: None,
        })
    }

    /// Labels every image of `train` once with the teacher, without augmentation
    /// ([`TeacherTargets::Clean`]).
    fn label_clean(
        &mut self,
        train: &Arc<dyn Dataset>,
        workers: usize,
    ) -> simclr_train::Result<()> {
        let (n, c) = (train.len(), train.num_classes());
        if n.saturating_mul(c).saturating_mul(4) > MAX_CLEAN_TARGET_BYTES {
            return Err(TrainError::InvalidConfig(format!(
                "teacher_targets clean keeps {n} × {c} logits in memory, more than {} GiB; \
                 use teacher_targets same_view",
                MAX_CLEAN_TARGET_BYTES >> 30
            )));
        }
        let mut lc = LoaderConfig::eval(
            self.cfg.training.train_batch_size.max(1),
            self.cfg.training.image_size,
        );
        lc.num_threads = workers;
        let loader = Loader::new(train.clone(), None, lc)?;
        // The evaluation loader serves every image once, in dataset order: row i is image i.
        let (logits, _) =
            simclr_eval::features(&self.teacher, &loader, "logits_sup", &self.device, false)?;
        if logits.dims() != [n, c] {
            return Err(TrainError::InvalidConfig(format!(
                "the teacher's pass over {n} images gave logits of shape {:?}",
                logits.dims()
            )));
        }
        self.clean_targets = Some(logits.to_dtype(DType::F32)?.to_device(&self.device)?);
        Ok(())
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
        let t = match &self.clean_targets {
            Some(table) => {
                let rows: Vec<u32> = batch.indices.iter().map(|&i| i as u32).collect();
                table.index_select(&Tensor::new(rows.as_slice(), &self.device)?, 0)?
            }
            // The teacher labels exactly the view the student sees, in inference mode.
            None => self
                .teacher
                .forward(&x, false)?
                .logits_sup
                .ok_or_else(no_head)?
                .detach(),
        };
        let s = self
            .student
            .forward(&x, true)?
            .logits_sup
            .ok_or_else(no_head)?;
        let kd = distillation_loss(&s, &t, self.cfg.temperature, self.cfg.tau_squared)?;
        let mut loss = (kd.clone() * self.cfg.alpha)?;
        let agree = simclr_train::batch_accuracy(&s, &t.argmax(D::Minus1)?)?;
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
    cfg.validate()?;
    let mut task = DistillTask::new(
        teacher,
        student,
        cfg,
        train.num_classes(),
        labelled,
        env.device,
    )?;
    // The teacher's pass counts in the stage's wall time (it replaces per-step teacher work).
    let t_label = std::time::Instant::now();
    if cfg.teacher_targets == TeacherTargets::Clean {
        task.label_clean(&train, cfg.run.num_workers)?;
    }
    let label_seconds = t_label.elapsed().as_secs_f64();
    let batch = cfg.training.train_batch_size.min(train.len());
    let mut lc = LoaderConfig::train(batch, 1, cfg.augment.clone(), cfg.seed);
    lc.num_threads = cfg.run.num_workers;
    let train_classes = train.class_names().to_vec();
    let loader = Loader::new(train, None, lc)?;
    let run = StageRun {
        stage: Stage::Distill,
        env,
        options: &cfg.run,
        extra_meta: simclr_train::stage_meta("distill_config", &cfg, Some(&train_classes))?,
    };
    let mut summary = run_stage(&mut task, &loader, &cfg.training, run)?;
    summary.wall_seconds += label_seconds;
    Ok((summary, task))
}
