//! Training-step throughput of contrastive pretraining: forward of both views, NT-Xent (+ the
//! online probe), backward and a LARS step — images/s (each image = two views), median of timed
//! steps after a warm-up step, and peak memory. `cargo bench -p simclr-pretrain [-- scenario…]`.

use candle_core::Device;
use simclr_models::{ModelConfig, Precision};
use simclr_pretrain::bench::time_pretrain_step;

fn bench(
    scenario: &str,
    what: &str,
    (base_width, side, batch): (usize, usize, usize),
    precision: Precision,
    runs: usize,
) {
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
    let t = time_pretrain_step(
        model,
        side,
        batch,
        runs,
        precision,
        &Device::Cpu,
        simclr_bench::reset_peak_rss,
    )
    .expect("pretraining step");
    let figure = simclr_bench::Figure {
        scenario: scenario.into(),
        images_per_s: batch as f64 / t,
        seconds_per_step: t,
        peak_rss_mib: simclr_bench::peak_rss_mib(),
        threads: simclr_bench::threads(),
        unit: None,
    };
    simclr_bench::report(what, &figure);
}

fn main() {
    simclr_bench::tune_allocator();
    // `SIMCLR_BENCH_STEPS=N`: time N steps instead of 3 (for a profiler).
    let steps = std::env::var("SIMCLR_BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    for (precision, suffix) in [(Precision::F32, ""), (Precision::Bf16, "-bf16")] {
        bench(
            &format!("pretrain-r18-cifar-32{suffix}"),
            &format!("pretrain step R18-CIFAR 32x32 batch 128 (x2 views), {precision}"),
            (64, 32, 128),
            precision,
            steps,
        );
        bench(
            &format!("pretrain-r18w16-28{suffix}"),
            &format!("pretrain step R18-CIFAR w16 28x28 batch 256 (x2 views), {precision}"),
            (16, 28, 256),
            precision,
            steps,
        );
    }
}
