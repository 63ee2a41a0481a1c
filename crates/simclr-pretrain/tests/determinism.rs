//! Two pretraining runs with the same settings give bit-identical checkpoints on two threads:
//! no reduction in the step (convolutions, BN, NT-Xent, the optimizer) depends on how rayon
//! shared out the work.

use simclr_train::StageEnv;
use std::sync::Arc;

use simclr_data::{load_dataset, DataOptions, Dataset, DatasetName, Split, SubsetDataset};
use simclr_models::ModelConfig;
use simclr_pretrain::{run_pretrain, PretrainConfig, PretrainData};

fn run(out: &std::path::Path, train: Arc<dyn Dataset>) -> Vec<(String, Vec<u32>)> {
    let model = ModelConfig {
        resnet_depth: 18,
        base_width: 8,
        ..ModelConfig::default()
    }
    .with_image_size(28);
    let mut config = PretrainConfig::new(model, 28);
    config.training.train_batch_size = 60; // 240 images: 4 steps, the last epoch's batches reshuffled
    config.training.schedule.train_steps = Some(6);
    config.training.schedule.warmup_epochs = 0.0;
    config.knn_every_epochs = 0;
    let data = PretrainData { train, test: None };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    let cpu = candle_core::Device::Cpu;
    pool.install(|| {
        run_pretrain(
            &config,
            &data,
            StageEnv {
                out_dir: out,
                resume: false,
                progress: false,
                device: &cpu,
            },
        )
    })
    .unwrap();
    let tensors = candle_core::safetensors::load(out.join("checkpoint.safetensors"), &cpu).unwrap();
    let mut all: Vec<(String, Vec<u32>)> = tensors
        .into_iter()
        .map(|(name, t)| {
            let v: Vec<f32> = t
                .to_dtype(candle_core::DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (name, v.into_iter().map(f32::to_bits).collect())
        })
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn two_runs_give_bit_identical_checkpoints() {
    let full = load_dataset(
        &DatasetName::FashionMnistSubset,
        Split::Train,
        &DataOptions::default(),
    )
    .unwrap();
    let train: Arc<dyn Dataset> =
        Arc::new(SubsetDataset::new(full, (0..240).map(|i| i * 41).collect()).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let a = run(&dir.path().join("a"), train.clone());
    let b = run(&dir.path().join("b"), train);
    assert_eq!(a.len(), b.len());
    assert!(
        a.iter().any(|(n, _)| n.contains("train_state")),
        "optimizer state is compared too"
    );
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert!(va == vb, "{na} differs between two identical runs");
    }
}
