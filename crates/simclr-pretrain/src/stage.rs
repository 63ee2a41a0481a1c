//! The contrastive pretraining stage: the model, the NT-Xent (or memory-buffer) loss, the online
//! linear probe, and kNN monitoring, run by the shared training loop of `simclr-train`.

use simclr_train::StageEnv;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use simclr_data::augment::AugmentConfig;
use simclr_data::{Batch, Dataset, Loader, LoaderConfig};
use simclr_eval::{knn_top1, KnnConfig, KnnData};
use simclr_models::{ForwardOptions, ModelConfig, Precision, SimclrModel, Stage};
use simclr_train::optim::OptimizerSettings;
use simclr_train::schedule::LrScheduleConfig;
use simclr_train::{
    run_stage, StageRun, StageSettings, StepOutput, TrainError, TrainSummary, TrainTask,
};

use crate::memory::{
    copy_variables, ema_update, memory_contrastive_loss, MemoryConfig, MemoryQueue,
};
use crate::objective::{nt_xent, NtXentConfig};
use simclr_collective::{Collective, SingleReplica};

/// Every setting of a pretraining run, with the official flag names.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PretrainConfig {
    pub model: ModelConfig,
    /// Input size, batch, schedule, optimizer, precision (flattened: the fields sit at this
    /// level in JSON and TOML).
    #[serde(flatten)]
    pub training: StageSettings,
    pub objective: NtXentConfig,
    pub augment: AugmentConfig,
    /// BN statistics over the two-view batch of every replica (the official `global_bn`);
    /// `false` normalises with each replica's own batch.
    #[serde(default = "default_true")]
    pub global_bn: bool,
    /// Train the supervised head on stop-gradient features as the official tf2 code does.
    pub lineareval_while_pretraining: bool,
    /// SimCLRv2's momentum encoder + memory buffer; `None` trains plain SimCLR.
    pub memory: Option<MemoryConfig>,
    pub seed: u64,
    /// kNN top-1 on the test set every this many epochs (0: never).
    pub knn_every_epochs: usize,
    pub knn: KnnConfig,
    /// Checkpoint cadence and history, resume policy, loader threads.
    #[serde(flatten)]
    pub run: simclr_train::RunOptions,
}

fn default_true() -> bool {
    true
}

impl PretrainConfig {
    /// The official defaults for a model at `image_size` (the CIFAR recipe at ≤ 32 px).
    pub fn new(model: ModelConfig, image_size: usize) -> Self {
        PretrainConfig {
            model,
            training: StageSettings {
                image_size,
                train_batch_size: 512,
                schedule: LrScheduleConfig::default(),
                optimizer: OptimizerSettings::default(),
                precision: Precision::F32,
            },
            objective: NtXentConfig::default(),
            augment: AugmentConfig::pretrain(image_size),
            global_bn: true,
            lineareval_while_pretraining: true,
            memory: None,
            seed: 0,
            knn_every_epochs: 1,
            knn: KnnConfig::default(),
            run: simclr_train::RunOptions::default(),
        }
    }
}

struct Momentum {
    varmap: VarMap,
    model: SimclrModel,
    queue: MemoryQueue,
    decay: f64,
}

pub struct PretrainTask {
    config: PretrainConfig,
    varmap: VarMap,
    model: SimclrModel,
    collective: Arc<dyn Collective>,
    momentum: Option<Momentum>,
    knn: Option<KnnData>,
    device: Device,
}

impl PretrainTask {
    pub fn new(
        config: PretrainConfig,
        device: &Device,
        collective: Arc<dyn Collective>,
        knn: Option<KnnData>,
    ) -> simclr_train::Result<Self> {
        let varmap = VarMap::new();
        let model = SimclrModel::init(&config.model, &varmap, config.seed, device)?
            .with_precision(config.training.precision);
        let momentum = match &config.memory {
            Some(mem) => {
                let mvarmap = VarMap::new();
                let mmodel = SimclrModel::init(&config.model, &mvarmap, config.seed, device)?
                    .with_precision(config.training.precision);
                copy_variables(&mvarmap, &varmap)?;
                let queue = MemoryQueue::new(
                    mem.queue_size,
                    config.model.proj_out_dim,
                    DType::F32,
                    device,
                )?;
                Some(Momentum {
                    varmap: mvarmap,
                    model: mmodel,
                    queue,
                    decay: mem.ema_decay,
                })
            }
            None => None,
        };
        Ok(PretrainTask {
            config,
            varmap,
            model,
            collective,
            momentum,
            knn,
            device: device.clone(),
        })
    }

    pub fn model(&self) -> &SimclrModel {
        &self.model
    }
}

impl TrainTask for PretrainTask {
    fn forward(&mut self, batch: &Batch, _step: u64) -> simclr_train::Result<StepOutput> {
        // Every replica loads the same global batch and keeps its own rows of it.
        let (rank, world) = (self.collective.rank(), self.collective.world_size());
        let rows = |t: &Tensor| -> simclr_train::Result<Tensor> {
            if world == 1 {
                return Ok(t.clone());
            }
            let n = t.dim(0)?;
            if n % world != 0 {
                return Err(TrainError::UnevenBatch {
                    batch: n,
                    replicas: world,
                });
            }
            Ok(t.narrow(0, rank * n / world, n / world)?)
        };
        let x = Tensor::cat(&[rows(&batch.views[0])?, rows(&batch.views[1])?], 0)?
            .to_device(&self.device)?;
        let replicas = self.config.global_bn.then_some(self.collective.as_ref());
        let opts = ForwardOptions {
            stop_gradient_supervised_input: true,
            replicas,
            ..ForwardOptions::mode(true)
        };
        let out = self.model.forward_with(&x, opts)?;
        let world = self.collective.world_size() as f64;
        let contrast = match &mut self.momentum {
            None => nt_xent(
                &out.proj_head_output,
                &self.config.objective,
                self.collective.as_ref(),
            )?,
            Some(m) => {
                let key_opts = ForwardOptions {
                    replicas,
                    ..ForwardOptions::mode(true)
                };
                let keys = m
                    .model
                    .forward_with(&x, key_opts)?
                    .proj_head_output
                    .detach();
                let negatives = if m.queue.is_empty() {
                    None
                } else {
                    Some(m.queue.negatives()?)
                };
                let r = memory_contrastive_loss(
                    &out.proj_head_output,
                    &keys,
                    negatives.as_ref(),
                    &self.config.objective,
                    self.collective.as_ref(),
                )?;
                m.queue.enqueue(&r.keys)?;
                r.contrastive
            }
        };
        let mut loss = contrast.loss.clone();
        let mut metrics = vec![
            (
                "contrast_loss".to_string(),
                contrast.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ),
            ("contrast_acc".to_string(), contrast.contrast_acc),
            ("contrast_entropy".to_string(), contrast.contrast_entropy),
        ];
        if let (true, Some(logits)) = (self.config.lineareval_while_pretraining, &out.logits_sup) {
            // Labels duplicated for the two views, as the official online probe does.
            let own = rows(&batch.labels)?;
            let labels = Tensor::cat(&[&own, &own], 0)?.to_device(&self.device)?;
            let sup = candle_nn::loss::cross_entropy(logits, &labels)?;
            let acc = simclr_train::batch_accuracy(logits, &labels)?;
            metrics.push((
                "supervised_loss".into(),
                sup.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            ));
            metrics.push(("supervised_acc".into(), acc));
            loss = (loss + sup)?;
        }
        // Gradients are summed over replicas: each contributes its share of the global mean.
        if world > 1.0 {
            loss = (loss / world)?;
        }
        Ok(StepOutput { loss, metrics })
    }

    fn after_step(&mut self, _step: u64) -> simclr_train::Result<()> {
        if let Some(m) = &self.momentum {
            ema_update(&m.varmap, &self.varmap, m.decay)?;
        }
        Ok(())
    }

    fn end_of_epoch(&mut self, epoch: usize) -> simclr_train::Result<Vec<(String, f64)>> {
        let every = self.config.knn_every_epochs;
        let Some(knn) = &self.knn else {
            return Ok(Vec::new());
        };
        if every == 0 || !(epoch + 1).is_multiple_of(every) {
            return Ok(Vec::new());
        }
        // Under the stage's own progress bar: no second one.
        let top1 = knn_top1(&self.model, knn, &self.config.knn, &self.device, false)?;
        Ok(vec![("knn_top1".into(), top1)])
    }

    fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    fn replicas(&self) -> Option<&dyn Collective> {
        Some(self.collective.as_ref())
    }

    fn model_config(&self) -> &ModelConfig {
        &self.config.model
    }

    fn extra_state(&self) -> simclr_train::Result<Vec<(String, Tensor)>> {
        let Some(m) = &self.momentum else {
            return Ok(Vec::new());
        };
        let mut out: Vec<(String, Tensor)> = m
            .queue
            .state_tensors()?
            .into_iter()
            .map(|(k, t)| (format!("queue/{k}"), t))
            .collect();
        let data = m.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        out.extend(
            data.iter()
                .map(|(k, v)| (format!("momentum_encoder/{k}"), v.as_tensor().clone())),
        );
        Ok(out)
    }

    fn load_extra_state(&mut self, state: &HashMap<String, Tensor>) -> simclr_train::Result<()> {
        let Some(m) = &mut self.momentum else {
            return Ok(());
        };
        let strip = |p: &str| -> HashMap<String, Tensor> {
            state
                .iter()
                .filter_map(|(k, t)| k.strip_prefix(p).map(|s| (s.to_string(), t.clone())))
                .collect()
        };
        m.queue.load_state_tensors(&strip("queue/"))?;
        let enc = strip("momentum_encoder/");
        let data = m.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in data.iter() {
            let t = enc.get(k).ok_or_else(|| TrainError::MissingState {
                key: format!("momentum_encoder/{k}"),
            })?;
            v.set(t)?;
        }
        Ok(())
    }
}

/// The datasets a pretraining run reads.
pub struct PretrainData {
    /// Unlabeled training images (labels feed only the online probe and the kNN bank).
    pub train: Arc<dyn Dataset>,
    /// Test images for the kNN monitor.
    pub test: Option<Arc<dyn Dataset>>,
}

/// Runs contrastive pretraining into `out_dir` (resuming from its checkpoint when `resume`).
pub fn run_pretrain(
    config: &PretrainConfig,
    data: &PretrainData,
    env: StageEnv,
) -> simclr_train::Result<TrainSummary> {
    let one = Arc::new(SingleReplica);
    run_pretrain_replica(config, data, env, one)
}

/// [`run_pretrain`] as one of several data-parallel replicas: every replica loads the same
/// global batch (`train_batch_size`) and trains on its share of the rows, with negatives
/// gathered, BN statistics and gradients summed over `replicas`; rank 0 writes the checkpoint
/// and the metrics.
pub fn run_pretrain_replica(
    config: &PretrainConfig,
    data: &PretrainData,
    env: StageEnv,
    replicas: Arc<dyn Collective>,
) -> simclr_train::Result<TrainSummary> {
    let mut config = config.clone();
    // The supervised head is the online probe: it exists exactly when the probe trains.
    config.model.num_classes = config
        .lineareval_while_pretraining
        .then(|| data.train.num_classes());
    let mut loader_cfg = LoaderConfig::train(
        config.training.train_batch_size,
        2,
        config.augment.clone(),
        config.seed,
    );
    loader_cfg.num_threads = config.run.num_workers;
    let loader = Loader::new(data.train.clone(), None, loader_cfg)?;
    let knn = match &data.test {
        Some(test) if config.knn_every_epochs > 0 => {
            let mut eval = LoaderConfig::eval(256, config.training.image_size);
            eval.num_threads = config.run.num_workers;
            Some(KnnData {
                bank: Loader::new(data.train.clone(), None, eval.clone())?,
                queries: Loader::new(test.clone(), None, eval)?,
            })
        }
        _ => None,
    };
    let primary = replicas.rank() == 0;
    let mut task = PretrainTask::new(config.clone(), env.device, replicas, knn)?;
    let run = StageRun {
        stage: Stage::Pretrain,
        // Only rank 0 draws a bar.
        env: StageEnv {
            progress: env.progress && primary,
            ..env
        },
        options: &config.run,
        extra_meta: simclr_train::stage_meta("pretrain_config", &config, None)?,
    };
    run_stage(&mut task, &loader, &config.training, run)
}

/// Where a pretraining run in `out_dir` keeps its checkpoint.
pub fn checkpoint_path(out_dir: &std::path::Path) -> PathBuf {
    out_dir.join(simclr_train::CHECKPOINT_FILE)
}
