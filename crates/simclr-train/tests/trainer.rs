//! The shared training loop: resumption reproduces an uninterrupted run, a non-finite loss stops
//! the run without touching the last checkpoint, metrics are logged once per step.

use std::sync::Arc;

use candle_core::Device;
use candle_nn::VarMap;
use simclr_data::augment::AugmentConfig;
use simclr_data::{Batch, Image, InMemoryDataset, Loader, LoaderConfig};
use simclr_models::{ModelConfig, SimclrModel};
use simclr_train::optim::{build_optimizer, named_vars, OptimizerSettings};
use simclr_train::{train, StepOutput, TrainError, TrainTask, TrainerConfig};

struct Supervised {
    config: ModelConfig,
    varmap: VarMap,
    model: SimclrModel,
    nan_at: Option<u64>,
}

impl Supervised {
    fn new(nan_at: Option<u64>) -> Self {
        let config = ModelConfig {
            resnet_depth: 18,
            base_width: 2,
            num_classes: Some(3),
            proj_out_dim: 8,
            ..Default::default()
        }
        .with_image_size(8);
        let varmap = VarMap::new();
        let model = SimclrModel::init(&config, &varmap, 3, &Device::Cpu).unwrap();
        Supervised {
            config,
            varmap,
            model,
            nan_at,
        }
    }
}

impl TrainTask for Supervised {
    fn forward(&mut self, batch: &Batch, step: u64) -> simclr_train::Result<StepOutput> {
        let logits = self
            .model
            .forward(&batch.views[0], true)?
            .logits_sup
            .unwrap();
        let mut loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
        if self.nan_at == Some(step) {
            loss = (loss * f64::NAN)?;
        }
        Ok(StepOutput {
            loss,
            metrics: vec![("probe".into(), step as f64)],
        })
    }
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn model_config(&self) -> &ModelConfig {
        &self.config
    }
}

fn loader() -> Loader {
    let images = (0..24)
        .map(|i| {
            Image::new(
                8,
                8,
                3,
                (0..192).map(|p| ((p * 7 + i * 31) % 256) as u8).collect(),
            )
        })
        .collect();
    let labels = (0..24).map(|i| i % 3).collect();
    let ds = InMemoryDataset::new(
        images,
        labels,
        vec!["a".into(), "b".into(), "c".into()],
        "synthetic".into(),
    );
    let mut cfg = LoaderConfig::train(8, 1, AugmentConfig::finetune(8), 5);
    cfg.num_threads = 1;
    Loader::new(Arc::new(ds), None, cfg).unwrap()
}

fn trainer(dir: &std::path::Path, total: u64, every: u64, resume: bool) -> TrainerConfig {
    TrainerConfig {
        out_dir: dir.to_path_buf(),
        stage: "test".into(),
        total_steps: total,
        checkpoint_every: every,
        log_every: 1,
        resume,
        progress: false,
        extra_meta: vec![],
    }
}

/// The lr depends on the step only, as the real schedules do.
fn lr(step: u64) -> f64 {
    0.5 / (1.0 + step as f64)
}

fn run(
    dir: &std::path::Path,
    total: u64,
    every: u64,
    resume: bool,
    nan_at: Option<u64>,
) -> simclr_train::Result<Vec<f64>> {
    let mut task = Supervised::new(nan_at);
    let mut opt = build_optimizer(named_vars(&task.varmap), &OptimizerSettings::default()).unwrap();
    Ok(train(
        &mut task,
        &loader(),
        opt.as_mut(),
        &lr,
        &trainer(dir, total, every, resume),
    )?
    .losses)
}

#[test]
fn resumed_run_repeats_the_uninterrupted_losses() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(full_dir.path(), 8, 0, false, None).unwrap();
    assert_eq!(
        full.len(),
        8,
        "3 batches per epoch: the run crosses two epoch boundaries"
    );

    let dir = tempfile::tempdir().unwrap();
    let first = run(dir.path(), 5, 0, false, None).unwrap();
    let rest = run(dir.path(), 8, 0, true, None).unwrap();
    assert_eq!(first, full[..5].to_vec());
    assert_eq!(
        rest,
        full[5..].to_vec(),
        "losses after the resume are the uninterrupted ones, bit for bit"
    );

    // The metrics file reads as one run: a row per step, in order.
    let steps: Vec<u64> = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    // The final checkpoint is a model checkpoint with the step.
    let ckpt =
        simclr_models::checkpoint::load(dir.path().join("checkpoint.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(ckpt.meta.step, 8);
    assert_eq!(ckpt.meta.extra["complete"], "true");
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let e = run(dir.path(), 8, 2, false, Some(5)).unwrap_err();
    match &e {
        TrainError::NonFiniteLoss {
            step,
            epoch,
            batch,
            last_checkpoint,
            ..
        } => {
            assert_eq!((*step, *epoch, *batch), (5, 1, 2));
            assert_eq!(
                last_checkpoint.as_deref(),
                Some(dir.path().join("checkpoint.safetensors").as_path())
            );
        }
        other => panic!("unexpected error {other}"),
    }
    let text = e.to_string();
    assert!(
        text.contains("step 5") && text.contains("last good checkpoint"),
        "{text}"
    );
    let meta =
        simclr_models::checkpoint::read_meta(dir.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta.step, 4, "the checkpoint of step 4 is untouched");
    // Resuming (without the fault) continues from step 4.
    let rest = run(dir.path(), 8, 2, true, None).unwrap();
    assert_eq!(rest.len(), 4);
}

#[test]
fn resuming_with_another_architecture_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), 2, 0, false, None).unwrap();
    let mut task = Supervised::new(None);
    task.config.proj_out_dim = 16;
    let other = VarMap::new();
    task.model = SimclrModel::init(&task.config, &other, 3, &Device::Cpu).unwrap();
    task.varmap = other;
    let mut opt = build_optimizer(named_vars(&task.varmap), &OptimizerSettings::default()).unwrap();
    let e = train(
        &mut task,
        &loader(),
        opt.as_mut(),
        &lr,
        &trainer(dir.path(), 4, 0, true),
    )
    .unwrap_err();
    assert!(e.to_string().contains("another architecture"), "{e}");
}

#[test]
fn a_fresh_run_into_a_finished_runs_folder_is_refused_and_leaves_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    run(dir.path(), 3, 0, false, None).unwrap();
    let ckpt = dir.path().join("checkpoint.safetensors");
    let metrics = dir.path().join("metrics.jsonl");
    let (ckpt_before, metrics_before) = (
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(&metrics).unwrap(),
    );
    let e = run(dir.path(), 5, 0, false, None).unwrap_err();
    assert!(matches!(e, TrainError::ExistingRun { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("--resume") && text.contains("checkpoint.safetensors"),
        "{text}"
    );
    assert_eq!(std::fs::read(&ckpt).unwrap(), ckpt_before);
    assert_eq!(std::fs::read(&metrics).unwrap(), metrics_before);
    // Resuming continues it.
    assert_eq!(run(dir.path(), 5, 0, true, None).unwrap().len(), 2);
}
