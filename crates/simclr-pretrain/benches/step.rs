//! Training-step throughput of contrastive pretraining: forward of both views, NT-Xent (+ the
//! online probe), backward and a LARS step — images/s (each image = two views), median of timed
//! steps after a warm-up step, and peak memory. `cargo bench -p simclr-pretrain [-- scenario…]`.

use std::sync::Arc;

use candle_core::{Device, Tensor};
use simclr_data::Batch;
use simclr_models::ModelConfig;
use simclr_pretrain::stage::{PretrainConfig, PretrainTask};
use simclr_pretrain::SingleReplica;
use simclr_train::optim::{build_optimizer, named_vars};
use simclr_train::TrainTask;

fn bench(scenario: &str, what: &str, base_width: usize, side: usize, batch: usize, runs: usize) {
    if !simclr_bench::selected(scenario) {
        return;
    }
    let model = ModelConfig {
        resnet_depth: 18,
        base_width,
        num_classes: Some(10),
        ..Default::default()
    }
    .with_image_size(side);
    let cfg = PretrainConfig::new(model, side);
    let mut task =
        PretrainTask::new(cfg, &Device::Cpu, Arc::new(SingleReplica), None).expect("task");
    let mut opt = build_optimizer(named_vars(TrainTask::varmap(&task)), &Default::default())
        .expect("optimizer");
    let view = || Tensor::rand(0f32, 1.0, (batch, 3, side, side), &Device::Cpu).expect("view");
    let labels = Tensor::new(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        &Device::Cpu,
    )
    .expect("labels");
    let b = Batch {
        views: vec![view(), view()],
        labels,
        indices: (0..batch).collect(),
        epoch: 0,
        index: 0,
    };
    let mut i = 0;
    let (t, peak) = simclr_bench::time_steps(1, runs, || {
        let out = task.forward(&b, i).expect("forward");
        let grads = out.loss.backward().expect("backward");
        opt.step(&grads, 0.1).expect("step");
        i += 1;
    });
    let figure = simclr_bench::Figure {
        scenario: scenario.into(),
        images_per_s: batch as f64 / t,
        seconds_per_step: t,
        peak_rss_mib: peak,
        threads: simclr_bench::threads(),
    };
    simclr_bench::report(what, &figure);
}

fn main() {
    simclr_models::tune_allocator();
    bench(
        "pretrain-r18-cifar-32",
        "pretrain step R18-CIFAR 32x32 batch 128 (x2 views)",
        64,
        32,
        128,
        3,
    );
    bench(
        "pretrain-r18w16-28",
        "pretrain step R18-CIFAR w16 28x28 batch 256 (x2 views)",
        16,
        28,
        256,
        3,
    );
}
