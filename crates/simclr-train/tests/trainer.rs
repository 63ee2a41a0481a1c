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

/// What goes wrong, and at which step.
#[derive(Clone, Copy)]
enum Fault {
    None,
    /// The loss is NaN.
    NanLoss(u64),
    /// The loss is multiplied by a large finite factor (a run whose weights blow up).
    LossTimes(u64, f64),
    /// A BN moving variance becomes infinite after the step (the loss stays finite).
    InfiniteStatistic(u64),
}

struct Supervised {
    config: ModelConfig,
    varmap: VarMap,
    model: SimclrModel,
    fault: Fault,
}

impl Supervised {
    fn new(nan_at: Option<u64>) -> Self {
        Self::with_fault(nan_at.map_or(Fault::None, Fault::NanLoss))
    }

    fn with_fault(fault: Fault) -> Self {
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
            fault,
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
        match self.fault {
            Fault::NanLoss(s) if s == step => loss = (loss * f64::NAN)?,
            Fault::LossTimes(s, k) if s == step => loss = (loss * k)?,
            _ => {}
        }
        Ok(StepOutput {
            loss,
            metrics: vec![("probe".into(), step as f64)],
        })
    }
    fn after_step(&mut self, step: u64) -> simclr_train::Result<()> {
        if matches!(self.fault, Fault::InfiniteStatistic(s) if s == step) {
            let data = self.varmap.data().lock().unwrap();
            let (_, var) = data
                .iter()
                .filter(|(k, _)| k.ends_with("moving_variance"))
                .min_by_key(|(k, _)| k.as_str())
                .unwrap();
            var.set(&(var.ones_like()? * f64::INFINITY)?)?;
        }
        Ok(())
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
        stage: simclr_models::Stage::Pretrain,
        total_steps: total,
        checkpoint_every: every,
        keep_checkpoint_max: simclr_train::KEEP_CHECKPOINT_MAX,
        allow_changed_settings: false,
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
    run_with(
        dir,
        total,
        every,
        resume,
        nan_at.map_or(Fault::None, Fault::NanLoss),
    )
}

fn run_with(
    dir: &std::path::Path,
    total: u64,
    every: u64,
    resume: bool,
    fault: Fault,
) -> simclr_train::Result<Vec<f64>> {
    run_cfg(&trainer(dir, total, every, resume), fault)
}

fn run_cfg(cfg: &TrainerConfig, fault: Fault) -> simclr_train::Result<Vec<f64>> {
    let mut task = Supervised::with_fault(fault);
    let mut opt = build_optimizer(named_vars(&task.varmap), &OptimizerSettings::default()).unwrap();
    Ok(train(&mut task, &loader(), opt.as_mut(), &lr, cfg)?.losses)
}

/// The stage folder holds one TensorBoard event file, and its scalars are the numbers of
/// `metrics.jsonl`, row for row (as f32), with the row's step.
fn assert_tensorboard_matches_metrics(dir: &std::path::Path) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().contains("tfevents"))
        .collect();
    assert_eq!(files.len(), 1, "one event file: {files:?}");
    let events = simclr_train::tensorboard::read_scalars(&files[0]).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), rows.len());
    for (e, row) in events.iter().zip(&rows) {
        let row = row.as_object().unwrap();
        assert_eq!(e.step, row["step"].as_i64().unwrap());
        let want: Vec<(String, f32)> = row
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "epoch_end"))
            .map(|(k, v)| (k.clone(), v.as_f64().unwrap() as f32))
            .collect();
        assert!(want.iter().any(|(k, _)| k == "loss"));
        assert_eq!(e.values, want, "step {}", e.step);
    }
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
    assert_tensorboard_matches_metrics(dir.path());
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

fn checkpoint_step(dir: &std::path::Path) -> u64 {
    simclr_models::checkpoint::read_meta(dir.join("checkpoint.safetensors"))
        .unwrap()
        .step
}

#[test]
fn a_diverging_finite_loss_stops_the_run() {
    // A loss a million times its running median, still finite: the run used to go on and exit
    // 0 with the blown-up network as its result.
    let dir = tempfile::tempdir().unwrap();
    let e = run_with(dir.path(), 12, 2, false, Fault::LossTimes(7, 1e6)).unwrap_err();
    match &e {
        TrainError::Diverged {
            step,
            value,
            median,
            last_checkpoint,
            ..
        } => {
            assert_eq!(*step, 7);
            assert!(value.is_finite() && *value > 1000.0 * median.max(1.0));
            assert_eq!(
                last_checkpoint.as_deref(),
                Some(dir.path().join("checkpoint.safetensors").as_path())
            );
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(e.to_string().contains("diverged"), "{e}");
    assert_eq!(checkpoint_step(dir.path()), 6);
    // An ordinary run of the same task (losses of order 1) never trips the bound.
    let ok = tempfile::tempdir().unwrap();
    assert_eq!(
        run_with(ok.path(), 12, 2, false, Fault::None)
            .unwrap()
            .len(),
        12
    );
}

#[test]
fn a_non_finite_bn_statistic_is_never_saved_as_the_last_good_checkpoint() {
    // The step-3 update poisons a moving variance; the loss of later steps may stay finite for a
    // while, but the checkpoint due at step 4 must not be written.
    let dir = tempfile::tempdir().unwrap();
    let e = run_with(dir.path(), 8, 2, false, Fault::InfiniteStatistic(2)).unwrap_err();
    match &e {
        TrainError::NonFiniteState {
            step,
            tensor,
            last_checkpoint,
            ..
        } => {
            assert_eq!(*step, 4);
            assert!(tensor.ends_with("moving_variance"), "{tensor}");
            assert!(last_checkpoint.is_some());
        }
        other => panic!("unexpected error {other}"),
    }
    assert_eq!(checkpoint_step(dir.path()), 2);
    // What is on disk is healthy: it loads (loaders refuse non-finite tensors).
    simclr_models::checkpoint::load(dir.path().join("checkpoint.safetensors"), &Device::Cpu)
        .unwrap();
}

#[test]
fn a_second_writer_is_refused_naming_the_holder_and_a_dead_one_blocks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lock_path = dir.path().join(".lock");
    let holder = std::fs::File::create(&lock_path).unwrap();
    holder.try_lock().unwrap();
    std::fs::write(&lock_path, "4242").unwrap();
    match run(dir.path(), 3, 0, false, None).unwrap_err() {
        e @ TrainError::Locked { .. } => assert!(e.to_string().contains("4242"), "{e}"),
        other => panic!("unexpected error {other}"),
    }
    assert!(!dir.path().join("checkpoint.safetensors").exists());
    // The lock dies with its holder (here: the file is closed); the lock file stays.
    drop(holder);
    assert_eq!(run(dir.path(), 3, 0, false, None).unwrap().len(), 3);
}

#[test]
fn temporaries_of_killed_checkpoint_writes_are_removed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    // What `simclr_fs::AtomicFile` names its temporary: `.<target>.<pid>-<n>.tmp`.
    let stale = dir.path().join(".checkpoint.safetensors.4242-0.tmp");
    std::fs::write(&stale, b"half a checkpoint").unwrap();
    let other = dir.path().join("notes.tmp");
    std::fs::write(&other, b"not ours").unwrap();
    run(dir.path(), 2, 0, false, None).unwrap();
    assert!(!stale.exists());
    assert!(other.exists());
}

fn kept_checkpoints(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
}

/// `keep_checkpoint_max` older checkpoints are kept, and a resume whose newest checkpoint is
/// damaged continues from the newest one that verifies, repeating the uninterrupted run.
#[test]
fn history_is_kept_and_resume_falls_back_past_a_damaged_checkpoint() {
    let full_dir = tempfile::tempdir().unwrap();
    let full = run(full_dir.path(), 10, 0, false, None).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let keep3 = |total, resume| TrainerConfig {
        keep_checkpoint_max: 3,
        ..trainer(dir.path(), total, 2, resume)
    };
    assert_eq!(run_cfg(&keep3(6, false), Fault::None).unwrap(), full[..6]);
    assert_eq!(
        kept_checkpoints(dir.path()),
        [
            "checkpoint-2.safetensors",
            "checkpoint-4.safetensors",
            "checkpoint.safetensors"
        ]
    );
    // One bit of the newest checkpoint's last tensor byte flipped on disk.
    let newest = dir.path().join("checkpoint.safetensors");
    let mut bytes = std::fs::read(&newest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x10;
    std::fs::write(&newest, &bytes).unwrap();
    // Without a fallback it would not load at all.
    assert!(matches!(
        simclr_models::checkpoint::load_tensors(&newest, &Device::Cpu),
        Err(simclr_models::checkpoint::CheckpointError::DigestMismatch { .. })
    ));
    let rest = run_cfg(&keep3(10, true), Fault::None).unwrap();
    assert_eq!(rest, full[4..], "resumed from step 4, bit for bit");
    assert_eq!(checkpoint_step(dir.path()), 10);
    assert_eq!(
        kept_checkpoints(dir.path()),
        [
            "checkpoint-6.safetensors",
            "checkpoint-8.safetensors",
            "checkpoint.safetensors"
        ]
    );
    // Each kept one is the state of its step.
    for step in [6u64, 8] {
        let p = dir.path().join(format!("checkpoint-{step}.safetensors"));
        assert_eq!(simclr_models::checkpoint::read_meta(p).unwrap().step, step);
    }
    // With the newest missing altogether, the newest older one is used.
    std::fs::remove_file(&newest).unwrap();
    let again = run_cfg(&keep3(10, true), Fault::None).unwrap();
    assert_eq!(again, full[8..]);
    // keep_checkpoint_max 1: no history at all.
    let single = tempfile::tempdir().unwrap();
    let keep1 = TrainerConfig {
        keep_checkpoint_max: 1,
        ..trainer(single.path(), 6, 2, false)
    };
    run_cfg(&keep1, Fault::None).unwrap();
    assert_eq!(kept_checkpoints(single.path()), ["checkpoint.safetensors"]);
}

/// A resume with other settings than the checkpoint's is refused with the differences; with
/// `allow_changed_settings` it continues and every later checkpoint records the change.
/// Options that do not change the computation (checkpoint cadence, loader threads) may change.
#[test]
fn resuming_with_changed_settings_is_refused_unless_allowed_and_then_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let with = |total, settings: &str, allow| TrainerConfig {
        extra_meta: vec![("test_config".into(), settings.into())],
        allow_changed_settings: allow,
        ..trainer(dir.path(), total, 0, true)
    };
    let a = r#"{"lr":0.1,"schedule":{"warmup":1},"checkpoint_every":0,"num_workers":0}"#;
    let b = r#"{"lr":0.2,"schedule":{"warmup":1},"checkpoint_every":0,"num_workers":0}"#;
    let only_options = r#"{"lr":0.1,"schedule":{"warmup":1},"checkpoint_every":7,"num_workers":3}"#;
    run_cfg(&with(3, a, false), Fault::None).unwrap();
    let before = std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap();
    let e = run_cfg(&with(5, b, false), Fault::None).unwrap_err();
    assert!(matches!(e, TrainError::ChangedSettings { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("lr: 0.1 -> 0.2")
            && !text.contains("warmup")
            && text.contains("--allow-changed-settings"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(dir.path().join("checkpoint.safetensors")).unwrap(),
        before,
        "a refused resume leaves the checkpoint as it was"
    );
    // Run options only: accepted, nothing recorded.
    run_cfg(&with(4, only_options, false), Fault::None).unwrap();
    let meta =
        simclr_models::checkpoint::read_meta(dir.path().join("checkpoint.safetensors")).unwrap();
    assert!(!meta.extra.contains_key("settings_changed"));
    // Allowed: continues, and the record stays in later checkpoints.
    run_cfg(&with(5, b, true), Fault::None).unwrap();
    let meta =
        simclr_models::checkpoint::read_meta(dir.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta.step, 5);
    assert_eq!(meta.extra["settings_changed"], "at step 4: lr: 0.1 -> 0.2");
    assert_eq!(meta.extra["test_config"], b);
    run_cfg(&with(6, b, false), Fault::None).unwrap();
    let meta =
        simclr_models::checkpoint::read_meta(dir.path().join("checkpoint.safetensors")).unwrap();
    assert_eq!(meta.extra["settings_changed"], "at step 4: lr: 0.1 -> 0.2");
}
