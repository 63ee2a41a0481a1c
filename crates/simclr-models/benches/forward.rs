//! Eval-mode forward throughput (images/s): R18 with the CIFAR stem at 32×32 and R50 1× at
//! 224×224, batch 64 — median of timed passes after a warm-up pass.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use simclr_models::{ModelConfig, SimclrModel};

fn bench(name: &str, config: ModelConfig, side: usize, batch: usize, runs: usize) {
    let vm = VarMap::new();
    let model = SimclrModel::init(&config, &vm, 0, &Device::Cpu).expect("model");
    let x = Tensor::rand(0f32, 1.0, (batch, 3, side, side), &Device::Cpu).expect("input");
    let mut times = Vec::new();
    for i in 0..runs + 1 {
        let t = Instant::now();
        let out = model.forward(&x, false).expect("forward");
        let _ = out.final_avg_pool.to_dtype(DType::F32).expect("sync");
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let t = times[times.len() / 2];
    println!(
        "{name:<36} batch {batch}: {:>8.1} images/s ({:.3} s per batch)",
        batch as f64 / t,
        t
    );
}

fn main() {
    let r18 = ModelConfig {
        resnet_depth: 18,
        num_classes: Some(10),
        ..Default::default()
    }
    .with_image_size(32);
    bench("eval forward R18-CIFAR 32x32", r18, 32, 64, 5);
    let r50 = ModelConfig::released(50, 1, false).with_image_size(224);
    bench("eval forward R50 1x 224x224", r50, 224, 64, 3);
}
