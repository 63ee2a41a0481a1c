//! The distillation loss against independent computations, and a student that learns its
//! teacher's labels.

use simclr_train::StageEnv;
use std::sync::Arc;

use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use simclr_data::augment::AugmentConfig;
use simclr_data::Dataset;
use simclr_distill::{distillation_loss, run_distill, DistillConfig, StudentInit, TeacherTargets};
use simclr_models::checkpoint::{save, CheckpointMeta};
use simclr_models::{ModelConfig, SimclrModel};
use simclr_train::optim::{OptimizerKind, OptimizerSettings};

fn softmax64(row: &[f64], tau: f64) -> Vec<f64> {
    let m = row.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = row.iter().map(|v| ((v - m) / tau).exp()).collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|v| v / z).collect()
}

fn random(n: usize, c: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            (0..c)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 6.0
                })
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f64>]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
}

#[test]
fn loss_and_gradient_match_float64_formulas() {
    let (n, c) = (6, 5);
    let s = random(n, c, 1);
    let t = random(n, c, 2);
    for (tau, tau2) in [(0.1, false), (1.0, false), (0.5, true)] {
        // −mean_x Σ_y P_T log P_S, with P = softmax(·/τ).
        let mut expect = 0.0;
        for i in 0..n {
            let pt = softmax64(&t[i], tau);
            let ps = softmax64(&s[i], tau);
            expect -= (0..c).map(|y| pt[y] * ps[y].ln()).sum::<f64>() / n as f64;
        }
        if tau2 {
            expect *= tau * tau;
        }
        let sv = Var::from_tensor(&tensor(&s)).unwrap();
        let loss = distillation_loss(sv.as_tensor(), &tensor(&t), tau, tau2).unwrap();
        let got = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - expect).abs() < 1e-4 * expect.abs().max(1.0),
            "τ {tau}: {got} vs {expect}"
        );
        // ∂L/∂s = (softmax(s/τ) − softmax(t/τ)) / (τ·n), times τ² when scaled.
        let g = loss
            .backward()
            .unwrap()
            .get(sv.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for i in 0..n {
            let (ps, pt) = (softmax64(&s[i], tau), softmax64(&t[i], tau));
            for y in 0..c {
                let mut want = (ps[y] - pt[y]) / (tau * n as f64);
                if tau2 {
                    want *= tau * tau;
                }
                assert!(
                    (g[i][y] as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "grad [{i},{y}] τ {tau}"
                );
            }
        }
    }
}

/// 32 real Fashion-MNIST images (the committed subset).
fn dataset() -> Arc<dyn Dataset> {
    let full = simclr_data::load_dataset(
        &simclr_data::DatasetName::FashionMnistSubset,
        simclr_data::Split::Train,
        &Default::default(),
    )
    .unwrap();
    Arc::new(simclr_data::SubsetDataset::new(full, (0..32).collect()).unwrap())
}

fn tiny(classes: usize) -> ModelConfig {
    ModelConfig {
        resnet_depth: 18,
        base_width: 2,
        proj_out_dim: 8,
        num_classes: Some(classes),
        ..Default::default()
    }
    .with_image_size(28)
}

fn predictions(model: &SimclrModel, ds: &Arc<dyn Dataset>) -> Vec<u32> {
    let loader =
        simclr_data::Loader::new(ds.clone(), None, simclr_data::LoaderConfig::eval(64, 28))
            .unwrap();
    let b = loader.batch(0, 0).unwrap();
    model
        .forward(&b.views[0], false)
        .unwrap()
        .logits_sup
        .unwrap()
        .argmax(1)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
}

fn teacher(dir: &std::path::Path, stage: &str, classes: usize) -> std::path::PathBuf {
    let vm = VarMap::new();
    let config = tiny(classes);
    SimclrModel::init(&config, &vm, 11, &Device::Cpu).unwrap();
    // A teacher with confident, varied predictions: scale up its (random) logits layer.
    for (name, v) in vm.data().lock().unwrap().iter() {
        if name.starts_with("head_supervised") {
            v.set(&(v.as_tensor() * 300.0).unwrap()).unwrap();
        }
    }
    let path = dir.join(format!("{stage}.safetensors"));
    save(&path, &vm, &CheckpointMeta::new(config, stage, 1)).unwrap();
    path
}

/// A new run into `out` on the CPU, without a progress bar.
fn fresh(out: &std::path::Path) -> StageEnv<'_> {
    StageEnv {
        out_dir: out,
        resume: false,
        progress: false,
        device: &Device::Cpu,
    }
}

fn settings() -> DistillConfig {
    let mut cfg = DistillConfig::new(28, true);
    cfg.training.train_batch_size = 32;
    cfg.augment = AugmentConfig {
        crop: false,
        flip: false,
        ..AugmentConfig::finetune(28)
    };
    cfg.training.schedule.train_steps = Some(200);
    cfg.training.schedule.warmup_epochs = 0.0;
    cfg.training.schedule.learning_rate = 0.1; // × 32/256 (linear scaling)
    cfg.training.optimizer = OptimizerSettings {
        optimizer: OptimizerKind::AdamW,
        weight_decay: 0.0,
        ..Default::default()
    };
    cfg.temperature = 0.1;
    cfg
}

#[test]
fn a_student_learns_its_teachers_labels() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset();
    let t_path = teacher(dir.path(), "finetune", 10);
    let t_model = simclr_models::checkpoint::load(&t_path, &Device::Cpu)
        .unwrap()
        .model;
    let target = predictions(&t_model, &ds);
    let distinct: std::collections::HashSet<_> = target.iter().collect();
    assert!(distinct.len() >= 2, "the teacher's labels are not constant");
    let (summary, task) = run_distill(
        &settings(),
        &t_path,
        &StudentInit::Scratch(tiny(10)),
        ds.clone(),
        &[],
        StageEnv {
            out_dir: &dir.path().join("out"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .unwrap();
    let untrained_vm = VarMap::new();
    let untrained = SimclrModel::init(
        task.student_config(),
        &untrained_vm,
        settings().seed,
        &Device::Cpu,
    )
    .unwrap();
    let before = predictions(&untrained, &ds)
        .iter()
        .zip(&target)
        .filter(|(a, b)| a == b)
        .count();
    let got = predictions(task.student(), &ds);
    let agree = got.iter().zip(&target).filter(|(a, b)| a == b).count();
    assert!(
        agree >= 26 && agree >= before + 10,
        "student agrees with its teacher on {agree}/32 images ({before} before training)"
    );
    assert!(
        summary.losses.last().unwrap() < &(0.97 * summary.losses[0]),
        "the distillation loss falls: {:?}",
        (summary.losses[0], summary.losses.last())
    );
}

#[test]
fn wrong_teacher_stage_or_class_count_fails_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset();
    let pre = teacher(dir.path(), "pretrain", 10);
    let e = run_distill(
        &settings(),
        &pre,
        &StudentInit::Scratch(tiny(10)),
        ds.clone(),
        &[],
        StageEnv {
            out_dir: &dir.path().join("a"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains(
            "stage \"pretrain\" cannot start distill; it needs one of finetune, supervised"
        ),
        "{e}"
    );
    let five = teacher(dir.path(), "finetune", 5);
    let e = run_distill(
        &settings(),
        &five,
        &StudentInit::Scratch(tiny(10)),
        ds,
        &[],
        StageEnv {
            out_dir: &dir.path().join("b"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("5") && e.to_string().contains("has 10"),
        "{e}"
    );
    assert!(!dir.path().join("a").join("checkpoint.safetensors").exists());
}

#[test]
fn a_temperature_or_alpha_without_meaning_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset();
    let t_path = teacher(dir.path(), "finetune", 10);
    for (tau, alpha, what) in [
        (0.0, 1.0, "temperature"),
        (-1.0, 1.0, "temperature"),
        (f64::NAN, 1.0, "temperature"),
        (1.0, -0.5, "alpha"),
        (1.0, 3.0, "alpha"),
    ] {
        let mut cfg = settings();
        cfg.temperature = tau;
        cfg.alpha = alpha;
        let out = dir.path().join(format!("{what}{tau}{alpha}"));
        let e = run_distill(
            &cfg,
            &t_path,
            &StudentInit::Scratch(tiny(10)),
            ds.clone(),
            &[],
            fresh(&out),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains(what), "{e}");
        assert!(!out.exists(), "nothing written for {what}");
    }
}

#[test]
fn clean_targets_equal_same_view_targets_when_the_view_is_the_image() {
    // Without crop and flip the student's view is the whole image, so the teacher's logits
    // computed once before training (`clean`) must be the ones it computes at every step
    // (`same_view`): the same losses step by step. A table row served for the wrong image,
    // or a stale one, would change them.
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset();
    let t_path = teacher(dir.path(), "finetune", 10);
    let run = |targets: TeacherTargets, out: &str| {
        let mut cfg = settings();
        cfg.training.schedule.train_steps = Some(12);
        cfg.teacher_targets = targets;
        // Batches of 8 of the 32 images: the table must be indexed by each image's index.
        cfg.training.train_batch_size = 8;
        let (summary, _) = run_distill(
            &cfg,
            &t_path,
            &StudentInit::Scratch(tiny(10)),
            ds.clone(),
            &[],
            fresh(&dir.path().join(out)),
        )
        .unwrap();
        summary.losses
    };
    let same = run(TeacherTargets::SameView, "same");
    let clean = run(TeacherTargets::Clean, "clean");
    assert_eq!(same.len(), 12);
    for (k, (a, b)) in same.iter().zip(&clean).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * a.abs().max(1.0),
            "step {k}: same view {a}, clean {b}"
        );
    }
    // And the setting is stored only when it is not the default (older run folders keep
    // their configuration hashes).
    let default = serde_json::to_value(settings()).unwrap();
    assert!(default.get("teacher_targets").is_none());
    let mut cfg = settings();
    cfg.teacher_targets = "clean".parse().unwrap();
    assert_eq!(
        serde_json::to_value(&cfg).unwrap()["teacher_targets"],
        "clean"
    );
    assert!("noisy".parse::<TeacherTargets>().is_err());
}
