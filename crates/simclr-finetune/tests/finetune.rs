//! Fine-tuning: initialisation from a pretrained checkpoint, linear evaluation keeps the encoder
//! fixed, and bad inputs fail before training.

use simclr_train::StageEnv;
use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use simclr_data::{Dataset, Image, InMemoryDataset};
use simclr_finetune::{run_finetune, FinetuneConfig, FinetuneInit};
use simclr_models::checkpoint::{load_tensors, save, CheckpointMeta};
use simclr_models::{ModelConfig, SimclrModel};

fn dataset() -> Arc<dyn Dataset> {
    let images = (0..30)
        .map(|i| {
            Image::new(
                8,
                8,
                3,
                (0..192).map(|p| ((p * 11 + i * 37) % 256) as u8).collect(),
            )
        })
        .collect();
    let labels = (0..30).map(|i| i % 3).collect();
    Arc::new(InMemoryDataset::new(
        images,
        labels,
        vec!["a".into(), "b".into(), "c".into()],
        "synthetic".into(),
    ))
}

fn pretrained(dir: &std::path::Path, stage: &str) -> std::path::PathBuf {
    let config = ModelConfig {
        resnet_depth: 18,
        base_width: 2,
        proj_out_dim: 8,
        num_classes: None,
        ..Default::default()
    }
    .with_image_size(8);
    let vm = VarMap::new();
    SimclrModel::init(&config, &vm, 2, &Device::Cpu).unwrap();
    let path = dir.join(format!("{stage}.safetensors"));
    save(&path, &vm, &CheckpointMeta::new(config, stage, 10)).unwrap();
    path
}

fn cfg() -> FinetuneConfig {
    let mut c = FinetuneConfig::new(8, 0.1);
    c.training.train_batch_size = 10;
    c.training.schedule.train_steps = Some(4);
    c
}

fn tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn starts_from_the_pretrained_weights_with_a_zero_logits_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = pretrained(dir.path(), "pretrain");
    let (_, pre) = load_tensors(&path, &Device::Cpu).unwrap();
    let task = simclr_finetune::FinetuneTask::new(
        &FinetuneInit::Pretrained(path),
        &cfg(),
        3,
        &Device::Cpu,
    )
    .unwrap();
    let now = tensors(task_varmap(&task));
    for (name, t) in &now {
        if name.starts_with("head_supervised") {
            assert_eq!(
                max_diff(t, &t.zeros_like().unwrap()),
                0.0,
                "{name} starts at zero"
            );
        } else {
            assert_eq!(
                max_diff(t, &pre[name]),
                0.0,
                "{name} comes from the checkpoint"
            );
        }
    }
    assert_eq!(
        simclr_train::TrainTask::model_config(&task).ft_proj_selector,
        1,
        "v2: from the first head layer"
    );
}

fn task_varmap(task: &simclr_finetune::FinetuneTask) -> &VarMap {
    simclr_train::TrainTask::varmap(task)
}

#[test]
fn linear_evaluation_trains_only_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let path = pretrained(dir.path(), "pretrain");
    let (_, pre) = load_tensors(&path, &Device::Cpu).unwrap();
    let mut c = cfg();
    c.fine_tune_after_block = 4;
    c.ft_proj_selector = 0;
    let ds = dataset();
    let (summary, task) = run_finetune(
        &c,
        &FinetuneInit::Pretrained(path),
        simclr_models::Stage::LinearEval,
        ds.clone(),
        (0..30).collect(),
        StageEnv {
            out_dir: &dir.path().join("out"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .unwrap();
    assert_eq!(summary.steps, 4);
    let after = tensors(task_varmap(&task));
    let mut head_moved = false;
    for (name, t) in &after {
        if name.starts_with("resnet.") {
            assert_eq!(
                max_diff(t, &pre[name]),
                0.0,
                "frozen encoder variable {name} changed"
            );
        }
        if name.starts_with("head_supervised") {
            head_moved |= max_diff(t, &t.zeros_like().unwrap()) > 0.0;
        }
    }
    assert!(head_moved, "the linear head trains");
}

#[test]
fn bad_inputs_fail_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dataset();
    let wrong = pretrained(dir.path(), "distill");
    let e = run_finetune(
        &cfg(),
        &FinetuneInit::Pretrained(wrong),
        simclr_models::Stage::Finetune,
        ds.clone(),
        (0..30).collect(),
        StageEnv {
            out_dir: &dir.path().join("a"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("\"distill\""), "{e}");
    let good = pretrained(dir.path(), "pretrain");
    // Labelled images of classes 0 and 1 only: class "c" has no label.
    let e = run_finetune(
        &cfg(),
        &FinetuneInit::Pretrained(good),
        simclr_models::Stage::Finetune,
        ds,
        vec![0, 1, 3, 4],
        StageEnv {
            out_dir: &dir.path().join("b"),
            resume: false,
            progress: false,
            device: &Device::Cpu,
        },
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("\"c\""), "{e}");
    assert!(
        !dir.path().join("a").exists() || !dir.path().join("a/checkpoint.safetensors").exists()
    );
}

/// The shared block is flattened: its fields keep their names and places in the stage's JSON, so
/// `--set finetune.*.train_batch_size=…` paths and the pipeline's stage-folder hashes (taken over
/// this JSON) are what they were when the fields were the config's own.
#[test]
fn shared_settings_serialise_in_place() {
    let mut c = FinetuneConfig::new(28, 0.01);
    c.training.precision = simclr_models::Precision::Bf16;
    let text = serde_json::to_string(&c).unwrap();
    let at = |key: &str| {
        text.find(&format!("\"{key}\":"))
            .unwrap_or_else(|| panic!("{key} missing from {text}"))
    };
    let order = [
        "image_size",
        "train_batch_size",
        "schedule",
        "optimizer",
        "precision",
        "ft_proj_selector",
        "fine_tune_after_block",
        "augment",
        "seed",
        "num_workers",
    ];
    for w in order.windows(2) {
        assert!(at(w[0]) < at(w[1]), "{} after {} in {text}", w[0], w[1]);
    }
    assert!(!text.contains("\"training\""), "{text}");
    let back: FinetuneConfig = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&back).unwrap(), text);
    assert_eq!(back.training.precision, simclr_models::Precision::Bf16);
    // f32 precision is left out, as before the block existed.
    let plain = serde_json::to_string(&FinetuneConfig::new(28, 0.01)).unwrap();
    assert!(!plain.contains("\"precision\""), "{plain}");
}
