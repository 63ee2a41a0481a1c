//! Eval-mode forward throughput (images/s): R18 with the CIFAR stem at 32×32 and R50 1× at
//! 224×224, batch 32 — median of timed passes after a warm-up pass, and peak memory.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use simclr_models::{ModelConfig, SimclrModel};

fn bench(scenario: &str, what: &str, config: ModelConfig, side: usize, batch: usize, runs: usize) {
    if !simclr_bench::selected(scenario) {
        return;
    }
    let vm = VarMap::new();
    let model = SimclrModel::init(&config, &vm, 0, &Device::Cpu).expect("model");
    let x = Tensor::rand(0f32, 1.0, (batch, 3, side, side), &Device::Cpu).expect("input");
    let (t, peak) = simclr_bench::time_steps(1, runs, || {
        let out = model.forward(&x, false).expect("forward");
        let _ = out.final_avg_pool.to_dtype(DType::F32).expect("sync");
    });
    let figure = simclr_bench::Figure {
        scenario: scenario.into(),
        images_per_s: batch as f64 / t,
        seconds_per_step: t,
        peak_rss_mib: peak,
        threads: simclr_bench::threads(),
        unit: None,
    };
    simclr_bench::report(what, &figure);
}

fn main() {
    simclr_bench::tune_allocator();
    let r18 = ModelConfig {
        resnet_depth: 18,
        num_classes: Some(10),
        ..Default::default()
    }
    .with_image_size(32);
    bench(
        "eval-r18-cifar-32",
        "eval forward R18-CIFAR 32x32 batch 64",
        r18,
        32,
        64,
        5,
    );
    let r50 = ModelConfig::released(50, 1, false).with_image_size(224);
    bench(
        "eval-r50-224",
        "eval forward R50 1x 224x224 batch 32",
        r50,
        224,
        32,
        3,
    );
}
