//! What a GPU session runs (`docs/gpu.md`): the pretraining step's throughput on any device
//! (`simclr bench-step`), and the parity of a device with the CPU on a whole training step
//! (`simclr parity`) — first each fused kernel alone (BN in training mode, NT-Xent's
//! normalisation and masked cross-entropy: the device's kernel against its CPU twin), then
//! values and gradients through every convolution, BN and head, in f32 and in bf16.

use std::collections::HashMap;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde_json::json;
use simclr_kernels::bn_ops;
use simclr_kernels::ntxent::{contrastive_ce, l2_normalize, ContrastLayout};
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
        unit: None,
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
    // The CPU side computes what the GPU computes: bf16 activations there too.
    let model = SimclrModel::init(config, &varmap, 1, device)?
        .with_precision(precision)
        .with_gpu_bf16_numerics();
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

/// A CPU f32 tensor of normal draws from a seeded SplitMix64 (candle cannot seed its CPU
/// generator), the same on every machine.
fn normal(seed: u64, mean: f64, std: f64, dims: &[usize]) -> candle_core::Result<Tensor> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut uniform = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let len: usize = dims.iter().product();
    let v: Vec<f32> = (0..len)
        .map(|_| {
            let (u, v) = (uniform(), uniform());
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            (mean + std * z) as f32
        })
        .collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
}

/// The output of `f` and the gradient of `Σ w ⊙ f(inputs)` (`w` a fixed random weight) with
/// respect to every input, on `device`, brought back to the CPU.
fn op_run(
    inputs: &[Tensor],
    weight_seed: u64,
    device: &Device,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let vars = inputs
        .iter()
        .map(|t| candle_core::Var::from_tensor(&t.to_device(device)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tensors)?;
    let cpu = Device::Cpu;
    let w = normal(weight_seed, 0.0, 1.0, out.dims())?.to_device(device)?;
    let grads = (&out * &w)?.sum_all()?.backward()?;
    let g = tensors
        .iter()
        .map(|t| match grads.get(t) {
            Some(g) => Ok(g.to_device(&cpu)?),
            None => bail!("an input of the op has no gradient"),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((out.to_device(&cpu)?, g))
}

/// Each fused kernel on `device` against its CPU twin (f32, tolerance 1e-5 relative L2), on odd
/// shapes and on one large enough to split every channel over several blocks.
fn ops_parity(device: &Device, failed: &mut Vec<String>) -> Result<()> {
    const TOL: f64 = 1e-5;
    type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;
    let mut seed = 0u64;
    let mut randn = |mean: f64, std: f64, dims: &[usize]| {
        seed += 1;
        normal(seed, mean, std, dims)
    };
    // (name, inputs, op, has a ReLU)
    let mut cases: Vec<(String, Vec<Tensor>, Op, bool)> = Vec::new();
    for (n, c, h, w) in [(3usize, 5usize, 7usize, 9usize), (64, 32, 28, 28)] {
        for (residual, relu) in [(false, false), (false, true), (true, true)] {
            let x = randn(0.5, 2.0, &[n, c, h, w])?;
            let affine = randn(0.0, 1.0, &[2, c])?;
            let mut inputs = vec![x, affine];
            if residual {
                inputs.push(randn(0.0, 1.0, &[n, c, h, w])?);
            }
            let op: Op = Box::new(move |t: &[Tensor]| {
                let count = t[0].elem_count() / t[0].dim(1)?;
                let moments = bn_ops::channel_moments(&t[0])?;
                let (stats, _, _) = bn_ops::moments_to_stats(&moments, count, 1e-5, DType::F32)?;
                bn_ops::bn_apply_add(&t[0], &stats, &t[1], t.get(2), relu)
            });
            let name = format!("bn {n}x{c}x{h}x{w} residual={residual} relu={relu}");
            cases.push((name, inputs, op, relu));
        }
    }
    for (n, d, offset, global, extra) in [
        (5usize, 33usize, 5usize, 15usize, 7usize),
        (256, 128, 0, 256, 0),
    ] {
        let layout = ContrastLayout {
            n,
            offset,
            global,
            inv_t: 10.0,
        };
        let h = randn(0.0, 1.0, &[2 * n, d])?;
        let cands = randn(0.0, 1.0, &[2 * global + extra, d])?;
        let op: Op = Box::new(move |t: &[Tensor]| {
            let (a, c) = (l2_normalize(&t[0])?, l2_normalize(&t[1])?);
            contrastive_ce(&a.matmul(&c.t()?)?, layout)
        });
        let name = format!("nt-xent n={n} d={d} offset={offset} global={global} extra={extra}");
        cases.push((name, vec![h, cands], op, false));
    }
    for (i, (name, inputs, op, relu)) in cases.iter().enumerate() {
        let (mut y0, mut g0) = op_run(inputs, i as u64, &Device::Cpu, op.as_ref())?;
        let (mut y, mut g) = op_run(inputs, i as u64, device, op.as_ref())?;
        if *relu {
            // The batch statistics are sums in another order on each device, so an output within
            // rounding of 0 can land on either side of the ReLU, which switches its gradient on
            // or off: a legitimate difference of the size of the gradient itself. Compare away
            // from that band (1e-4 of the largest output) only.
            let band = 1e-4 * y0.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let keep = (y0.abs()?.gt(band)? * y.abs()?.gt(band)?)?.to_dtype(DType::F32)?;
            let masked = |t: &Tensor| -> Result<Tensor> {
                Ok(if t.dims() == keep.dims() {
                    (t * &keep)?
                } else {
                    t.clone()
                })
            };
            (y0, y) = (masked(&y0)?, masked(&y)?);
            g0 = g0.iter().map(masked).collect::<Result<_>>()?;
            g = g.iter().map(masked).collect::<Result<_>>()?;
        }
        let mut checks = vec![("output".to_string(), rel(&y, &y0)?)];
        for (k, (a, b)) in g.iter().zip(&g0).enumerate() {
            checks.push((format!("gradient of input {k}"), rel(a, b)?));
        }
        for (what, r) in checks {
            let ok = r <= TOL;
            println!(
                "{}",
                json!({"op": name, "check": what, "max_rel": r, "tol": TOL, "ok": ok,
                       "device": format!("{device:?}")})
            );
            if !ok {
                failed.push(format!("{name} {what}: {r:.2e} > {TOL:.0e}"));
            }
        }
    }
    Ok(())
}

/// `simclr parity`: each fused kernel, then one training step of each model on the CPU and on `device`, in f32 and in
/// bf16, from the same weights and inputs; one JSON line per comparison, and an error when one
/// is out of tolerance (relative L2 error: f32 1e-4, bf16 2e-2).
pub fn parity(device: &Device) -> Result<()> {
    let models = [("r18_w16", 32usize, 8usize), ("r50_sk1_w16", 64, 4)];
    let mut failed = Vec::new();
    ops_parity(device, &mut failed)?;
    for (name, side, batch) in models {
        let mut config = crate::pipeline::model_for(name, side)?;
        config.num_classes = Some(10);
        let x = Tensor::rand(0f32, 1.0, (2 * batch, 3, side, side), &Device::Cpu)?;
        let labels: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
        let labels = Tensor::new(labels, &Device::Cpu)?;
        for (precision, tol) in [(Precision::F32, 1e-4), (Precision::Bf16, 2e-2)] {
            // The same computation on both sides: bf16 on the CPU rounds at the same points
            // (operands of every product, its result; `with_gpu_bf16_numerics`), so this is
            // the device's parity.
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
