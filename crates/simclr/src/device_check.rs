//! What a GPU session runs (`docs/gpu.md`): the pretraining step's throughput on any device
//! (`simclr bench-step`), and the parity of a device with the CPU on a whole training step
//! (`simclr parity`) — values and gradients through every convolution, BN and head, in f32 and
//! in bf16.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;
use simclr_models::{ModelConfig, Precision, SimclrModel};
use simclr_pretrain::{nt_xent, NtXentConfig, SingleReplica};

/// `simclr bench-step`: prints the pretraining step's figure as a `BENCH` line.
pub fn bench_step(
    model: &str,
    image_size: usize,
    batch: usize,
    steps: usize,
    precision: Precision,
    device: &Device,
) -> Result<()> {
    let mut config = crate::pipeline::model_for(model, image_size)?;
    config.num_classes = Some(if image_size > 32 { 1000 } else { 10 });
    let t = simclr_pretrain::bench::time_pretrain_step(
        config,
        image_size,
        batch,
        steps.max(1),
        precision,
        device,
        simclr_bench::reset_peak_rss,
    )?;
    let figure = simclr_bench::Figure {
        scenario: format!("pretrain-{model}-{image_size}-{precision}"),
        images_per_s: batch as f64 / t,
        seconds_per_step: t,
        peak_rss_mib: simclr_bench::peak_rss_mib(),
        threads: simclr_bench::threads(),
    };
    let what =
        format!("pretrain step {model} {image_size}² batch {batch} {precision} on {device:?}");
    simclr_bench::report(&what, &figure);
    Ok(())
}

/// Loss, projection output and every trainable gradient of one training-mode step.
fn step(
    config: &ModelConfig,
    x: &Tensor,
    labels: &Tensor,
    precision: Precision,
    device: &Device,
) -> Result<(Tensor, Tensor, HashMap<String, Tensor>)> {
    let varmap = VarMap::new();
    let model = SimclrModel::init(config, &varmap, 1, device)?.with_precision(precision);
    let x = x.to_device(device)?;
    let out = model.forward(&x, true)?;
    let contrast = nt_xent(
        &out.proj_head_output,
        &NtXentConfig::default(),
        &SingleReplica,
    )?;
    let labels = Tensor::cat(&[labels, labels], 0)?.to_device(device)?;
    let logits = out
        .logits_sup
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the parity model has a supervised head"))?;
    let loss = (contrast.loss + candle_nn::loss::cross_entropy(logits, &labels)?)?;
    let grads = loss.backward()?;
    let mut g = HashMap::new();
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in data.iter() {
        if let Some(t) = grads.get(var.as_tensor()) {
            g.insert(name.clone(), t.to_device(&Device::Cpu)?);
        }
    }
    Ok((
        loss.to_device(&Device::Cpu)?,
        out.proj_head_output.to_device(&Device::Cpu)?,
        g,
    ))
}

/// Relative L2 error ‖a − b‖ / ‖b‖ (‖a − b‖ when b is 0).
fn rel(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    let (err, scale) = (norm(&(&a - &b)?)?, norm(&b)?);
    Ok(if scale == 0.0 { err } else { err / scale })
}

/// `simclr parity`: one training step of each model on the CPU and on `device`, in f32 and in
/// bf16, from the same weights and inputs; one JSON line per comparison, and an error when one
/// is out of tolerance (relative L2 error: f32 1e-4, bf16 2e-2).
pub fn parity(device: &Device) -> Result<()> {
    let models = [("r18_w16", 32usize, 8usize), ("r50_sk1_w16", 64, 4)];
    let mut failed = Vec::new();
    for (name, side, batch) in models {
        let mut config = crate::pipeline::model_for(name, side)?;
        config.num_classes = Some(10);
        let x = Tensor::rand(0f32, 1.0, (2 * batch, 3, side, side), &Device::Cpu)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
        let labels = Tensor::new(labels, &Device::Cpu)?;
        for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 2e-2)] {
            // The same computation on both sides: bf16 on the CPU rounds at the same points
            // (operands of every product, its result), so this is the device's parity.
            let (loss0, proj0, grads0) = step(&config, &x, &labels, precision, &Device::Cpu)?;
            let (loss, proj, grads) = step(&config, &x, &labels, precision, device)?;
            let mut worst = ("", 0f64);
            for (k, g0) in &grads0 {
                match grads.get(k) {
                    Some(g) => {
                        let r = rel(g, g0)?;
                        if r > worst.1 {
                            worst = (k.as_str(), r);
                        }
                    }
                    None => bail!("{name}: {k} has no gradient on {device:?}"),
                }
            }
            let checks = [
                ("loss", rel(&loss, &loss0)?, String::new()),
                ("proj_head_output", rel(&proj, &proj0)?, String::new()),
                ("gradients (worst)", worst.1, worst.0.to_string()),
            ];
            for (what, r, detail) in checks {
                let ok = r <= tol;
                println!(
                    "{}",
                    json!({"model": name, "precision": precision.to_string(), "check": what,
                           "max_rel": r, "tol": tol, "ok": ok, "where": detail,
                           "device": format!("{device:?}")})
                );
                if !ok {
                    failed.push(format!("{name} {precision} {what}: {r:.2e} > {tol:.0e}"));
                }
            }
        }
    }
    if !failed.is_empty() {
        bail!("parity out of tolerance: {}", failed.join("; "))
    }
    Ok(())
}
