//! One timed pretraining step on synthetic data, shared by `cargo bench -p simclr-pretrain` and
//! `simclr bench-step` (which runs it on a GPU): both views through the model, NT-Xent and the
//! online probe, backward and a LARS step, on random images.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use simclr_data::Batch;
use simclr_models::{ModelConfig, Precision};
use simclr_train::optim::{build_optimizer, named_vars};
use simclr_train::TrainTask;

use crate::stage::{PretrainConfig, PretrainTask};
use crate::SingleReplica;

/// Median seconds of `steps` pretraining steps of `model` at `side`² with `batch` images (two
/// views each), after one warm-up step. Each step ends with the loss copied to the host, so
/// asynchronous devices are timed to completion. `on_window` runs just before the timed steps
/// (to start a peak-memory window).
pub fn time_pretrain_step(
    model: ModelConfig,
    side: usize,
    batch: usize,
    steps: usize,
    precision: Precision,
    device: &Device,
    on_window: impl FnOnce(),
) -> simclr_train::Result<f64> {
    let mut cfg = PretrainConfig::new(model, side);
    cfg.training.precision = precision;
    let mut task = PretrainTask::new(cfg, device, Arc::new(SingleReplica), None)?;
    let mut opt = build_optimizer(named_vars(TrainTask::varmap(&task)), &Default::default())?;
    let classes = task.model().config().num_classes.unwrap_or(1).max(1) as u32;
    let view = || Tensor::rand(0f32, 1.0, (batch, 3, side, side), &Device::Cpu);
    let labels: Vec<u32> = (0..batch as u32).map(|i| i % classes).collect();
    let b = Batch {
        views: vec![view()?, view()?],
        labels: Tensor::new(labels, &Device::Cpu)?,
        indices: (0..batch).collect(),
        epoch: 0,
        index: 0,
    };
    let steps = steps.max(1);
    let mut times = Vec::with_capacity(steps);
    let mut on_window = Some(on_window);
    for i in 0..=steps {
        if i == 1 {
            if let Some(f) = on_window.take() {
                f();
            }
        }
        let t = Instant::now();
        let out = task.forward(&b, i as u64)?;
        let grads = out.loss.backward()?;
        opt.step(&grads, 0.1)?;
        out.loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        if i > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}
